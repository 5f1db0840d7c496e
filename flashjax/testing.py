"""Tiny OPT checkpoints for tests, examples and the README.

``synthetic_hf_checkpoint`` needs only numpy and safetensors; ``random_hf_checkpoint`` builds a
real ``transformers.OPTForCausalLM`` (the ``test`` extra: torch, transformers) to compare with.
"""

from __future__ import annotations

import json
from statistics import NormalDist
from pathlib import Path

import numpy as np


def tiny_opt_config(**overrides) -> dict:
    """A small pre-LN OPT ``config.json`` dict; keyword arguments override any field."""
    cfg = dict(model_type="opt", vocab_size=96, hidden_size=32, num_hidden_layers=2, ffn_dim=128,
               num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32,
               do_layer_norm_before=True, activation_function="relu", pad_token_id=1,
               bos_token_id=2, eos_token_id=2, dropout=0.0, attention_dropout=0.0)
    cfg.update(overrides)
    return cfg


def random_hf_checkpoint(path: str | Path, config: dict | None = None, seed: int = 0,
                         dtype: str = "float32", bias_scale: float = 0.02):
    """Save a randomly initialised ``OPTForCausalLM`` with ``save_pretrained`` and return it
    (in float32, eager attention, for use as the reference).

    Biases and LayerNorm parameters are randomised too (HF initialises them to constants,
    which would hide transposition bugs).
    """
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    hf_cfg = OPTConfig(**(config or tiny_opt_config()))
    hf_cfg._attn_implementation = "eager"
    model = OPTForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, bias_scale)
            elif "layer_norm" in name:
                p.normal_(1.0, 0.1)
    model.to(getattr(torch, dtype)).save_pretrained(str(path), safe_serialization=True)
    return model.float()


def synthetic_hf_checkpoint(path: str | Path, config: dict | None = None, seed: int = 0,
                            dtype: str = "float16", shard_layers: int | None = None,
                            ffn_active: float | None = None) -> Path:
    """Write an OPT checkpoint with random weights in Hugging Face's file layout using numpy
    only: ``config.json`` plus ``model.safetensors``, or, with ``shard_layers``, shards of that
    many layers and a ``model.safetensors.index.json``. Tensors are generated one layer at a
    time, so large shapes (OPT-1.3B) fit in little memory when sharded.

    Random FFNs fire about half their neurons; ``ffn_active`` shifts the fc1 biases so that
    about that fraction fires instead (pre-activations are ~N(0, (0.02 sqrt(d))^2) after the
    layer norm), as in trained ReLU models."""
    import ml_dtypes
    from safetensors.numpy import save_file

    cfg = config or tiny_opt_config()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    np_dtype = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
                "float32": np.float32}[dtype]
    rng = np.random.default_rng(seed)
    d, n, v = cfg["hidden_size"], cfg["ffn_dim"], cfg["vocab_size"]
    p = cfg.get("word_embed_proj_dim") or d

    def w(*shape, scale=0.02):
        return (rng.standard_normal(shape, np.float32) * scale).astype(np_dtype)

    def norm():
        return {"weight": (1 + w(d, scale=0.1).astype(np.float32)).astype(np_dtype),
                "bias": w(d)}

    pre = "model.decoder."
    top = {f"{pre}embed_tokens.weight": w(v, p),
           f"{pre}embed_positions.weight": w(cfg["max_position_embeddings"] + 2, d)}
    if p != d:
        top[f"{pre}project_in.weight"] = w(d, p)
        top[f"{pre}project_out.weight"] = w(p, d)
    if cfg.get("do_layer_norm_before", True):
        top.update({f"{pre}final_layer_norm.{k}": a for k, a in norm().items()})

    def layer(i):
        t = {}
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[f"{pre}layers.{i}.self_attn.{proj}.weight"] = w(d, d)
            t[f"{pre}layers.{i}.self_attn.{proj}.bias"] = w(d)
        for nm in ("self_attn_layer_norm", "final_layer_norm"):
            t.update({f"{pre}layers.{i}.{nm}.{k}": a for k, a in norm().items()})
        fc1_bias = w(n)
        if ffn_active is not None:
            shift = NormalDist().inv_cdf(1 - ffn_active) * 0.02 * d ** 0.5
            fc1_bias = (fc1_bias.astype(np.float32) - shift).astype(np_dtype)
        t[f"{pre}layers.{i}.fc1.weight"], t[f"{pre}layers.{i}.fc1.bias"] = w(n, d), fc1_bias
        t[f"{pre}layers.{i}.fc2.weight"], t[f"{pre}layers.{i}.fc2.bias"] = w(d, n), w(d)
        return t

    layers = cfg["num_hidden_layers"]
    if shard_layers is None:
        tensors = dict(top)
        for i in range(layers):
            tensors.update(layer(i))
        save_file(tensors, str(path / "model.safetensors"))
    else:
        weight_map = {}
        groups = [range(s, min(s + shard_layers, layers)) for s in range(0, layers, shard_layers)]
        for g, group in enumerate(groups):
            tensors = dict(top) if g == 0 else {}
            for i in group:
                tensors.update(layer(i))
            name = f"model-{g + 1:05d}-of-{len(groups):05d}.safetensors"
            save_file(tensors, str(path / name))
            weight_map.update(dict.fromkeys(tensors, name))
            del tensors
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    (path / "config.json").write_text(json.dumps({**cfg, "torch_dtype": dtype}, indent=1))
    return path


def synthetic_store(root: str | Path, config: dict | None = None, **checkpoint) -> Path:
    """``synthetic_hf_checkpoint`` into ``root/hf`` (``checkpoint``: its keyword arguments),
    converted into ``root/fj``; returns the converted model directory."""
    from flashjax.store.convert import convert

    root = Path(root)
    synthetic_hf_checkpoint(root / "hf", config, **checkpoint)
    convert(root / "hf", root / "fj", progress=False)
    return root / "fj"
