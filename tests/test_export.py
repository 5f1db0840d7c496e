"""export_hf: flashjax params -> Hugging Face OPT checkpoint, checked against transformers and
against the converter (export then convert must give back the same model).

float32 tolerance: ||ours - ref|| / ||ref|| <= 1e-4 on teacher-forced logits, as in
test_parity: both sides do the same float32 arithmetic in a different order (rounding, ~1e-7),
while a wrong transpose or a missing tensor gives an O(1) error.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import flashjax
from flashjax.config import ModelConfig
from flashjax.model.layers import KVCache
from flashjax.model.decoder import forward, init_params
from flashjax.store.export import export_hf, hf_tensors
from flashjax.testing import tiny_opt_config

VARIANTS = {
    "pre_ln": tiny_opt_config(),
    "post_ln_proj": tiny_opt_config(do_layer_norm_before=False, word_embed_proj_dim=16),
}
SEQ = 24


def rel_err(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def random_params(cfg: ModelConfig, seed: int):
    """The tree of init_params filled with N(0, 0.1) (norm scales 1 + N(0, 0.1)) in numpy (no per-shape compiles), so zero
    biases and unit norms cannot hide a transposition or a swapped tensor."""
    shapes = jax.eval_shape(functools.partial(init_params, cfg, seed))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        x = 0.1 * rng.standard_normal(s.shape, np.float32)
        return jnp.asarray(x + 1 if path[-1].key == "scale" else x)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def flashjax_logits(cfg, params, ids):
    b, s = ids.shape
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    tokens = jnp.asarray(ids, jnp.int32)
    logits, _ = forward(cfg, params, tokens, positions, tokens > -1, KVCache.init(cfg, b, s))
    return np.asarray(logits)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def exported(request, tmp_path_factory):
    cfg = ModelConfig.from_hf_config(VARIANTS[request.param])
    params = random_params(cfg, seed=sorted(VARIANTS).index(request.param))
    out = export_hf(params, cfg, tmp_path_factory.mktemp(request.param) / "hf", dtype="float32")
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, size=(2, SEQ))
    return cfg, params, out, ids, flashjax_logits(cfg, params, ids)


def test_transformers_logits_match(exported):
    from transformers import OPTForCausalLM

    cfg, _, out, ids, ours = exported
    ref = OPTForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = ref(torch.tensor(ids)).logits.numpy()
    assert theirs.shape == ours.shape
    assert rel_err(ours, theirs) <= 1e-4


def test_convert_roundtrip_logits_match(exported, tmp_path):
    cfg, _, out, ids, ours = exported
    flashjax.convert(out, tmp_path / "fj", progress=False)
    model = flashjax.load(tmp_path / "fj", progress=False)
    assert model.cfg == cfg
    assert rel_err(np.asarray(model.logits(ids)), ours) <= 1e-4


def test_files(exported):
    from safetensors import safe_open

    cfg, _, out, _, _ = exported
    hf = json.loads((out / "config.json").read_text())
    assert ModelConfig.from_hf_config(hf) == cfg and hf["torch_dtype"] == "float32"
    with safe_open(out / "model.safetensors", "np") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys  # tied
    assert all(k.startswith("model.decoder.") for k in keys)
    assert not list(out.parent.glob(".*partial*"))


def test_float16_and_untied_head(tmp_path):
    cfg = ModelConfig.from_hf_config(tiny_opt_config(tie_word_embeddings=False))
    params = random_params(cfg, seed=3)
    out = export_hf(params, cfg, tmp_path / "hf")
    tensors = hf_tensors(params, cfg)
    from safetensors.numpy import load_file

    saved = load_file(out / "model.safetensors")
    assert set(saved) == set(tensors) and "lm_head.weight" in saved
    assert all(v.dtype == np.float16 for v in saved.values())
    np.testing.assert_array_equal(saved["lm_head.weight"],
                                  np.asarray(params["lm_head"]["kernel"]).T.astype(np.float16))


def test_refuses_existing_dir_and_wrong_tree(tmp_path):
    cfg = ModelConfig.from_hf_config(tiny_opt_config())
    params = random_params(cfg, 0)
    export_hf(params, cfg, tmp_path / "hf")
    with pytest.raises(FileExistsError, match="already exists"):
        export_hf(params, cfg, tmp_path / "hf")
    export_hf(params, cfg, tmp_path / "hf", overwrite=True)
    del params["layers_1"]["ffn"]["fc2"]["kernel"]
    with pytest.raises(ValueError, match="missing"):
        export_hf(params, cfg, tmp_path / "other")
    with pytest.raises(ValueError, match="dtype"):
        export_hf(random_params(cfg, 0), cfg, tmp_path / "x", dtype="int8")


def test_streamed_export_of_an_opt_store(converted, tmp_path):
    """``export_model_dir`` on a converted OPT store gives the checkpoint it came from."""
    from transformers import OPTForCausalLM

    from flashjax.store.export import export_model_dir

    c = converted("post_ln_proj")
    out = export_model_dir(c.model_dir, tmp_path / "hf", dtype="float32", progress=False)
    back = OPTForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    ids = torch.tensor(np.random.default_rng(3).integers(3, 96, size=(2, SEQ)))
    with torch.no_grad():
        assert rel_err(back(ids).logits.numpy(), c.reference(ids).logits.numpy()) <= 1e-6
