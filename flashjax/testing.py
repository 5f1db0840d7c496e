"""Tiny OPT and Llama-family checkpoints for tests, examples and the README.

``synthetic_hf_checkpoint`` needs only numpy and safetensors; ``random_hf_checkpoint`` builds a
real ``transformers`` model (``OPTForCausalLM``, ``LlamaForCausalLM``, ``MistralForCausalLM``
or ``Qwen2ForCausalLM``, from the config's ``model_type``; the ``test`` extra: torch,
transformers) to compare with.
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


def tiny_llama_config(model_type: str = "llama", **overrides) -> dict:
    """A small ReLU Llama-family ``config.json`` dict (``model_type`` llama, mistral or qwen2)
    with grouped-query attention (4 heads, 2 key/value heads); keyword arguments override any
    field."""
    cfg = dict(model_type=model_type, vocab_size=96, hidden_size=32, num_hidden_layers=2,
               intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=128, hidden_act="relu", rms_norm_eps=1e-6,
               rope_theta=10000.0, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
               eos_token_id=2, attention_dropout=0.0)
    if model_type in ("mistral", "qwen2"):
        cfg["sliding_window"] = None
    cfg.update(overrides)
    return cfg


def _hf_classes(model_type: str):
    import transformers

    names = {"opt": "OPT", "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[model_type]
    return (getattr(transformers, f"{names}Config"),
            getattr(transformers, f"{names}ForCausalLM"))


def random_hf_checkpoint(path: str | Path, config: dict | None = None, seed: int = 0,
                         dtype: str = "float32", bias_scale: float = 0.02):
    """Save a randomly initialised transformers model of the config's family with
    ``save_pretrained`` and return it (in float32, eager attention, for use as the reference).

    Biases and norm parameters are randomised too (HF initialises them to constants, which
    would hide transposition bugs).
    """
    import torch

    config = config or tiny_opt_config()
    config_class, model_class = _hf_classes(config.get("model_type", "opt"))
    torch.manual_seed(seed)
    hf_cfg = config_class(**config)
    hf_cfg._attn_implementation = "eager"
    model = model_class(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, bias_scale)
            elif "norm" in name:
                p.normal_(1.0, 0.1)
    model.to(getattr(torch, dtype)).save_pretrained(str(path), safe_serialization=True)
    return model.float()


def _opt_tensors(cfg, w, np_dtype, ffn_active):
    """OPT's tensors: the top-level ones and a function making layer i's."""
    d, n, v = cfg["hidden_size"], cfg["ffn_dim"], cfg["vocab_size"]
    p = cfg.get("word_embed_proj_dim") or d

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

    return top, layer


def _llama_tensors(cfg, w, np_dtype):
    """A Llama-family model's tensors: the top-level ones and a function making layer i's."""
    d, n, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or \
        cfg["num_attention_heads"]
    k = cfg.get("head_dim") or d // heads
    qkv_bias = cfg["model_type"] == "qwen2" or cfg.get("attention_bias", False)
    o_bias = cfg["model_type"] == "llama" and cfg.get("attention_bias", False)

    def norm():
        return (1 + w(d, scale=0.1).astype(np.float32)).astype(np_dtype)

    top = {"model.embed_tokens.weight": w(v, d), "model.norm.weight": norm()}
    if not cfg.get("tie_word_embeddings", False):
        top["lm_head.weight"] = w(v, d)

    def layer(i):
        pre = f"model.layers.{i}."
        t = {f"{pre}input_layernorm.weight": norm(),
             f"{pre}post_attention_layernorm.weight": norm()}
        for proj, width in (("q_proj", heads * k), ("k_proj", kv_heads * k),
                            ("v_proj", kv_heads * k)):
            t[f"{pre}self_attn.{proj}.weight"] = w(width, d)
            if qkv_bias:
                t[f"{pre}self_attn.{proj}.bias"] = w(width)
        t[f"{pre}self_attn.o_proj.weight"] = w(d, heads * k)
        if o_bias:
            t[f"{pre}self_attn.o_proj.bias"] = w(d)
        t[f"{pre}mlp.gate_proj.weight"], t[f"{pre}mlp.up_proj.weight"] = w(n, d), w(n, d)
        t[f"{pre}mlp.down_proj.weight"] = w(d, n)
        return t

    return top, layer


def synthetic_hf_checkpoint(path: str | Path, config: dict | None = None, seed: int = 0,
                            dtype: str = "float16", shard_layers: int | None = None,
                            ffn_active: float | None = None) -> Path:
    """Write an OPT or Llama-family checkpoint (the config's ``model_type``) with random
    weights in Hugging Face's file layout using numpy only: ``config.json`` plus
    ``model.safetensors``, or, with ``shard_layers``, shards of that
    many layers and a ``model.safetensors.index.json``. Tensors are generated one layer at a
    time, so large shapes (OPT-1.3B, Llama-2-7B) fit in little memory when sharded.

    Random FFNs fire about half their neurons; for OPT ``ffn_active`` shifts the fc1 biases so that
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

    def w(*shape, scale=0.02):
        return (rng.standard_normal(shape, np.float32) * scale).astype(np_dtype)

    if cfg.get("model_type", "opt") != "opt":
        if ffn_active is not None:
            raise ValueError("ffn_active shifts OPT's fc1 biases; a gated FFN has none")
        top, layer = _llama_tensors(cfg, w, np_dtype)
    else:
        top, layer = _opt_tensors(cfg, w, np_dtype, ffn_active)
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
