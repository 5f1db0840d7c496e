"""Llama-family ReLU models (Llama, Mistral, Qwen2; gated FFN in three-part bundles) against
transformers, densely and flash-backed.

float32 tolerance as for OPT (test_parity): teacher-forced logits rel L2 <= 1e-4; the two
sides differ only in rounding order (~1e-7 seen).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import flashjax
from flashjax import ConfigError
from flashjax.model import decoder
from flashjax.model.layers import KVCache
from flashjax.store import bundles
from flashjax.store.export import export_hf
from flashjax.testing import random_hf_checkpoint, tiny_llama_config
from tests.test_parity import hf_greedy, hf_logits, max_token_kl, prompts, rel_err

LLAMA_VARIANTS = {
    # grouped-query attention: 4 query heads share 2 key/value heads
    "llama_gqa": tiny_llama_config(),
    # Llama-3.1's RoPE scaling, tied embeddings, multi-query attention (one key/value head),
    # positions past original_max_position_embeddings so that the scaling matters
    "llama3_tied": tiny_llama_config(
        num_key_value_heads=1, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "llama_linear": tiny_llama_config(rope_scaling={"rope_type": "linear", "factor": 4.0},
                                      attention_bias=True, num_key_value_heads=4),
    "mistral": tiny_llama_config("mistral", num_hidden_layers=3, intermediate_size=96),
    "qwen2": tiny_llama_config("qwen2", tie_word_embeddings=True, hidden_size=48,
                               num_attention_heads=6, num_key_value_heads=2),
}
# Wider FFNs for the flash tests: fractional budgets need the FFN to be most of the model.
FLASH_VARIANTS = {
    "flash_llama": tiny_llama_config(hidden_size=64, intermediate_size=2048, num_hidden_layers=3),
    "flash_qwen2": tiny_llama_config("qwen2", hidden_size=64, intermediate_size=2048,
                                     num_key_value_heads=1),
}
PROMPT_LEN = 40


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """llama(variant) -> (model_dir, transformers reference), converted once per variant."""
    made = {}

    def get(variant):
        if variant not in made:
            root = tmp_path_factory.mktemp(variant)
            variants = LLAMA_VARIANTS | FLASH_VARIANTS
            ref = random_hf_checkpoint(root / "hf", variants[variant],
                                       seed=sorted(variants).index(variant))
            flashjax.convert(root / "hf", root / "fj", progress=False)
            made[variant] = (root / "fj", ref)
        return made[variant]

    return get


@pytest.mark.parametrize("variant", sorted(LLAMA_VARIANTS))
def test_logits_and_greedy_match_transformers(llama, variant):
    model_dir, ref = llama(variant)
    model = flashjax.load(model_dir, progress=False)
    ids = prompts(96, seed=5, length=PROMPT_LEN)
    ours, want = model.logits(ids), hf_logits(ref, ids)
    assert ours.shape == want.shape
    assert rel_err(ours, want) <= 1e-4
    assert max_token_kl(ours, want) <= 1e-6
    prompt = ids[0, :12].tolist()
    assert model.generate(prompt, max_new_tokens=24, stop_at_eos=False) == \
        hf_greedy(ref, prompt, 24)


@pytest.mark.parametrize("variant", ["llama_gqa", "llama3_tied"])
def test_cached_decoding_equals_recompute(llama, variant):
    """Token-by-token decoding through the KV cache gives the full forward's logits."""
    model_dir, _ = llama(variant)
    model = flashjax.load(model_dir, progress=False)
    cfg, seq = model.cfg, prompts(96, seed=6, batch=2, length=30)
    full = model.logits(seq)
    prompt = 8
    cache = KVCache.init(cfg, 2, 64)
    positions = np.broadcast_to(np.arange(prompt, dtype=np.int32), (2, prompt))
    logits, cache = decoder.forward(cfg, model.params, seq[:, :prompt], positions,
                                    np.ones((2, prompt), bool), cache)
    assert rel_err(np.asarray(logits), full[:, :prompt]) <= 1e-5
    for t in range(prompt, seq.shape[1]):
        step, cache = decoder.decode_step(cfg, model.params, seq[:, t].astype(np.int32),
                                          np.full(2, t, np.int32), cache)
        assert rel_err(np.asarray(step), full[:, t]) <= 1e-5, t


@pytest.mark.parametrize("budget", [0.3, 0.5])
@pytest.mark.parametrize("variant", sorted(FLASH_VARIANTS))
def test_oracle_flash_generation_equals_dense(llama, variant, budget):
    model_dir, _ = llama(variant)
    dense = flashjax.load(model_dir, progress=False)
    flash = flashjax.load(model_dir, dram_budget=budget, predictor="oracle", max_context=64)
    prompt = prompts(96, seed=7, batch=1, length=10)[0].tolist()
    want = dense.generate(prompt, max_new_tokens=16, stop_at_eos=False)
    got, stats = flash.generate(prompt, max_new_tokens=16, stop_at_eos=False, return_stats=True)
    assert got == want
    assert stats["rows_loaded"] > 0 and stats["peak_dram_bytes"] <= stats["dram_budget_bytes"]
    ids = prompts(96, seed=8, batch=1, length=20)
    assert rel_err(flash.logits(ids), dense.logits(ids)) <= 1e-5


def test_rows_on_disk_are_gate_up_down(llama, tmp_path):
    """Neuron i's row: gate_proj row i, up_proj row i, down_proj column i, nothing else."""
    model_dir, ref = llama("llama_gqa")
    manifest = json.loads((model_dir / "manifest.json").read_text())
    d, n = 32, 128
    assert manifest["layout"]["ffn"]["parts"] == {"gate": [0, d], "up": [d, 2 * d],
                                                  "down": [2 * d, 3 * d]}
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    for layer in range(2):
        rows = bundles.read_layer(model_dir, layer)
        assert rows.shape == (n, 3 * d)
        mlp = f"model.layers.{layer}.mlp."
        np.testing.assert_array_equal(rows[:, :d], state[f"{mlp}gate_proj.weight"])
        np.testing.assert_array_equal(rows[:, d:2 * d], state[f"{mlp}up_proj.weight"])
        np.testing.assert_array_equal(rows[:, 2 * d:], state[f"{mlp}down_proj.weight"].T)


@pytest.mark.parametrize("variant", ["llama3_tied", "qwen2", "llama_linear"])
def test_export_round_trips_through_transformers(llama, variant, tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir, ref = llama(variant)
    model = flashjax.load(model_dir, progress=False)
    out = export_hf(model.params, model.cfg, tmp_path / "hf", dtype="float32")
    back = AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    assert type(back) is type(ref)
    ids = prompts(96, seed=9)
    assert rel_err(hf_logits(back, ids), hf_logits(ref, ids)) <= 1e-6
    # and back into flashjax: the same store
    flashjax.convert(out, tmp_path / "fj", progress=False)
    again = flashjax.load(tmp_path / "fj", progress=False)
    np.testing.assert_array_equal(again.logits(ids), model.logits(ids))


def _drelu_reference(ref):
    """The transformers model with each MLP computing down(relu(gate x) * relu(up x))."""
    for layer in ref.model.layers:
        mlp = layer.mlp
        mlp.forward = (lambda m: lambda x: m.down_proj(torch.relu(m.gate_proj(x))
                                                       * torch.relu(m.up_proj(x))))(mlp)
    return ref


def test_drelu_model_dense_and_flash(tmp_path):
    """A TurboSparse-style dReLU model, made by hand from a Mistral config: dense logits equal
    a reference that computes relu(gate) * relu(up), and flash generation equals dense."""
    cfg = tiny_llama_config("mistral", hidden_size=64, intermediate_size=2048)
    ref = _drelu_reference(random_hf_checkpoint(tmp_path / "hf", cfg, seed=11))
    from flashjax.testing import synthetic_hf_checkpoint, tiny_opt_config

    synthetic_hf_checkpoint(tmp_path / "opt", tiny_opt_config())
    with pytest.raises(ConfigError, match="'drelu' needs a gated FFN"):
        flashjax.convert(tmp_path / "opt", tmp_path / "opt-fj", activation="drelu",
                         progress=False)
    manifest = flashjax.convert(tmp_path / "hf", tmp_path / "fj", activation="drelu",
                                progress=False)
    assert manifest.config.activation == "drelu"
    dense = flashjax.load(tmp_path / "fj", progress=False)
    ids = prompts(96, seed=12)
    assert rel_err(dense.logits(ids), hf_logits(ref, ids)) <= 1e-4
    flashjax.convert(tmp_path / "hf", tmp_path / "relu", progress=False)
    plain = flashjax.load(tmp_path / "relu", progress=False)
    assert rel_err(plain.logits(ids), dense.logits(ids)) > 1e-2  # the activation matters
    prompt = ids[0, :10].tolist()
    want = dense.generate(prompt, max_new_tokens=16, stop_at_eos=False)
    assert want == hf_greedy(ref, prompt, 16)
    flash = flashjax.load(tmp_path / "fj", dram_budget=0.4, predictor="oracle", max_context=64)
    got, stats = flash.generate(prompt, max_new_tokens=16, stop_at_eos=False, return_stats=True)
    assert got == want
    # a dReLU neuron needs both gate and up > 0: about a quarter of random neurons fire
    assert stats["rows_needed"] < 0.4 * 2048 * 2 * (len(prompt) + 15)


@pytest.mark.parametrize("field,value,message", [
    ("hidden_act", "gelu", "field 'hidden_act' is 'gelu'"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0},
     "'rope_scaling' has type 'yarn'; flashjax supports"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "lacks \\['low_freq_factor'"),
    ("mlp_bias", True, "field 'mlp_bias' is True"),
    ("num_key_value_heads", 3, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
])
def test_refuses_what_it_cannot_run(tmp_path, field, value, message):
    (tmp_path / "config.json").write_text(json.dumps({**tiny_llama_config(), field: value}))
    with pytest.raises(ConfigError, match=message):
        flashjax.ModelConfig.from_json_file(tmp_path / "config.json")


def test_sliding_window_limits_sequences(tmp_path):
    """Mistral with a sliding window shorter than its positions: sequences stay within the
    window (where the window attends to everything), longer ones are refused."""
    cfg = tiny_llama_config("mistral", sliding_window=24, max_position_embeddings=64)
    ref = random_hf_checkpoint(tmp_path / "hf", cfg, seed=13)
    flashjax.convert(tmp_path / "hf", tmp_path / "fj", progress=False)
    model = flashjax.load(tmp_path / "fj", progress=False)
    assert model.cfg.max_sequence == 24
    ids = prompts(96, seed=14, length=24)
    assert rel_err(model.logits(ids), hf_logits(ref, ids)) <= 1e-4
    with pytest.raises(ValueError, match="exceeds sliding_window 24"):
        model.generate(ids[0, :20].tolist(), max_new_tokens=5)


def test_predictors_train_and_run_on_llama(tmp_path):
    """collect -> train-predictors -> flash generation with the trained predictors, on a
    Llama model with a tokenizer; the activity collected is relu(gate x) > 0."""
    from flashjax.predictor.collect import collect, open_arrays
    from flashjax.predictor.train import train_predictors
    from tests.test_predictor import _text, save_word_tokenizer

    cfg = tiny_llama_config(vocab_size=300, hidden_size=64, intermediate_size=2048)
    random_hf_checkpoint(tmp_path / "hf", cfg, seed=15)
    save_word_tokenizer(tmp_path / "hf", ("<pad>", "<s>", "</s>", "<unk>"))  # Llama's ids
    model_dir = tmp_path / "fj"
    flashjax.convert(tmp_path / "hf", model_dir, progress=False)
    text = tmp_path / "train.txt"
    text.write_text("\n\n".join(_text(300, 1)))
    dense = flashjax.load(model_dir, progress=False)
    data = tmp_path / "acts"
    meta = collect(dense, text, data, tokens=4096, seq_len=64, batch=8, progress=False)
    assert meta["complete"] and meta["tokens_written"] >= 4096
    ffn_in, active = open_arrays(data, 0)
    x = np.asarray(ffn_in[:64].read().result(), np.float32)
    gate = np.asarray(dense.params["layers_0"]["ffn"]["gate"]["kernel"])
    want = (x @ gate) > 0
    got = np.unpackbits(np.asarray(active[:64].read().result()), axis=-1, count=2048,
                        bitorder="little").astype(bool)
    assert 0.3 < got.mean() < 0.7  # a random gate fires about half its neurons
    assert (got != want).mean() < 0.01  # (recomputed from float16 inputs: rare flips at 0)
    metrics = train_predictors(model_dir, data, rank=8, steps=80, batch=256, progress=False)
    assert len(metrics["layers"]) == 2
    flash = flashjax.load(model_dir, dram_budget=0.5, max_context=64)
    assert flash.selector.name == "lowrank"
    ids, stats = flash.generate(dense.encode("the river runs"), max_new_tokens=6,
                                stop_at_eos=False, return_stats=True)
    assert len(ids) == 6 and stats["rows_needed"] > 0
    from flashjax.predictor.evaluate import evaluate

    result = evaluate(model_dir, text, dram_budget=0.5, tokens=128, seq_len=32,
                      progress=False, max_context=64)
    assert np.isfinite(result["ppl_dense"]) and np.isfinite(result["ppl_sparse"])


def test_sharded_checkpoint_and_unbundled_reads(tmp_path):
    """A numpy-made Llama checkpoint in one-layer safetensors shards converts to the same
    store as the single file; reading it unbundled (three arrays) gives the bundled reads'
    rows and tokens, equal to dense."""
    from flashjax.testing import synthetic_hf_checkpoint

    cfg = tiny_llama_config(hidden_size=64, intermediate_size=2048, num_hidden_layers=2)
    synthetic_hf_checkpoint(tmp_path / "one", cfg, seed=16)
    synthetic_hf_checkpoint(tmp_path / "sharded", cfg, seed=16, shard_layers=1)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    for name in ("one", "sharded"):
        flashjax.convert(tmp_path / name, tmp_path / f"{name}-fj", progress=False)
    for layer in range(2):
        np.testing.assert_array_equal(bundles.read_layer(tmp_path / "one-fj", layer),
                                      bundles.read_layer(tmp_path / "sharded-fj", layer))
    path = tmp_path / "sharded-fj"
    bundles.write_split(path)
    assert len(list((path / bundles.SPLIT_DIR).glob("gate_*"))) == 2
    dense = flashjax.load(path, progress=False)
    prompt = [1, 17, 33, 5]
    want = dense.generate(prompt, 8, stop_at_eos=False)
    runs = {}
    for bundled in (True, False):
        flash = flashjax.load(path, dram_budget=0.5, predictor="oracle", bundled=bundled,
                              max_context=64)
        ids, stats, state = flash.generate(prompt, 8, stop_at_eos=False, return_stats=True,
                                           return_state=True)
        runs[bundled] = (ids, stats["rows_loaded"],
                         [np.asarray(p).copy() for b in state.buffers for p in b.parts])
    assert runs[True][0] == runs[False][0] == want
    assert runs[True][1] == runs[False][1] > 0
    for a, b in zip(runs[True][2], runs[False][2]):
        np.testing.assert_array_equal(a, b)


def test_cli_export_streams_sharded_checkpoint(llama, tmp_path):
    """``flashjax export`` writes the store back layer by layer, in shards with an index,
    that transformers loads with the reference's logits; the output appears only complete."""
    from transformers import AutoModelForCausalLM

    from flashjax.cli import main
    from flashjax.store.export import export_model_dir

    model_dir, ref = llama("mistral")
    assert main(["export", str(model_dir), str(tmp_path / "hf"), "--dtype", "float32"]) == 0
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"),
                                                attn_implementation="eager").eval()
    ids = prompts(96, seed=17)
    assert rel_err(hf_logits(back, ids), hf_logits(ref, ids)) <= 1e-6
    sharded = export_model_dir(model_dir, tmp_path / "sharded", shard_bytes=100_000,
                               progress=False)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = AutoModelForCausalLM.from_pretrained(str(sharded), attn_implementation="eager")
    assert rel_err(hf_logits(back.eval(), ids), hf_logits(ref, ids)) <= 1e-6
    with pytest.raises(FileExistsError):
        export_model_dir(model_dir, sharded)
    # a damaged row is caught, and nothing is left behind
    store = model_dir.parent / "damaged"
    import shutil

    shutil.copytree(model_dir, store)
    shard = store / "ffn" / "layer_001" / "c" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(bundles.StoreError, match="crc32c mismatch"):
        export_model_dir(store, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))


@pytest.mark.parametrize("variant", sorted(LLAMA_VARIANTS))
def test_config_round_trips(variant):
    cfg = flashjax.ModelConfig.from_hf_config(LLAMA_VARIANTS[variant])
    assert flashjax.ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg
    assert cfg.bundle_width == 3 * cfg.hidden_size and cfg.ffn_parts == ("gate", "up", "down")


def test_rope_frequencies_match_transformers():
    """Every supported rope_scaling type against transformers' own initialisation; "dynamic"
    only differs past max_position_embeddings (which flashjax refuses), so it is plain RoPE."""
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from flashjax.config import rope_frequencies

    scalings = {"linear": {"factor": 4.0}, "dynamic": {"factor": 2.0},
                "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 32}}
    for kind, extra in scalings.items():
        d = tiny_llama_config(head_dim=32, rope_theta=50000.0,
                              rope_scaling={"rope_type": kind, **extra})
        ours = rope_frequencies(flashjax.ModelConfig.from_hf_config(d))
        # (transformers' dynamic frequencies at its default length, max_position_embeddings)
        theirs, scale = ROPE_INIT_FUNCTIONS[kind](HFLlamaConfig(**d), "cpu")
        assert scale == 1.0
        np.testing.assert_allclose(ours, theirs.double().numpy(), rtol=1e-6, err_msg=kind)
        if kind != "dynamic":
            plain = rope_frequencies(flashjax.ModelConfig.from_hf_config(
                tiny_llama_config(head_dim=32, rope_theta=50000.0)))
            assert not np.allclose(ours, plain)
