"""Model configuration read from a Hugging Face ``config.json``.

A config is the static description jit specialises on: frozen and hashable. ``ModelConfig``
holds what every family shares (sizes, special tokens) and what the engine needs to know about
the FFN: its bundle parts and its activity rule. ``OPTConfig`` and ``LlamaConfig`` (Llama,
Mistral and Qwen2 checkpoints) add their own fields; ``ModelConfig.from_hf_config`` picks the
family from ``model_type``. Each accepts only what flashjax can run and refuses anything else
with an error that names the field, the value found and what is supported.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from pathlib import Path
from typing import Any, ClassVar

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A ``config.json`` that flashjax cannot run."""


# The FFN activities flashjax computes sparsely. "relu": OPT's relu(W_up x + b), or in a gated
# FFN relu(W_gate x) * (W_up x); "drelu": relu(W_gate x) * relu(W_up x) (TurboSparse);
# "silu": SwiGLU, silu(W_gate x) * (W_up x), where every neuron fires a little: sparse only
# with per-layer ``activation_thresholds`` (``flashjax calibrate``), below which a neuron's
# |silu(W_gate x)| is taken as 0 (an approximation the user asks for by calibrating).
ACTIVATIONS = ("relu", "drelu", "silu")
GATED_ONLY = ("drelu", "silu")
THRESHOLDS_FIELD = "activation_thresholds"  # flashjax's own config.json field (SwiGLU)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """What every decoder family has. Use ``OPTConfig``/``LlamaConfig``, or ``from_hf_config``."""

    vocab_size: int
    hidden_size: int  # d_model: width of the residual stream, attention and FFN input
    num_hidden_layers: int
    ffn_dim: int  # neurons per FFN layer (rows of the flash bundle store)
    num_attention_heads: int
    max_position_embeddings: int
    tie_word_embeddings: bool = True
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2
    activation: str = "relu"  # one of ACTIVATIONS
    # silu only: per layer, the |silu(gate)| at or below which a neuron is skipped (None: none
    # is, the dense SwiGLU model)
    activation_thresholds: tuple[float, ...] | None = None
    model_type: str = "opt"

    family: ClassVar[str]
    # The parts of one neuron's bundle row, in order; the last is the down projection, the
    # others read the FFN input (their Flax kernels are [D, N], the down kernel [N, D]).
    ffn_parts: ClassVar[tuple[str, ...]]
    ffn_bias: ClassVar[bool]  # a bias per neuron on the first part, and one on the output

    _POSITIVE: ClassVar[tuple[str, ...]] = (
        "vocab_size", "hidden_size", "num_hidden_layers", "ffn_dim", "num_attention_heads",
        "max_position_embeddings")

    def __post_init__(self):
        for name in self._POSITIVE:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {name!r} must be a positive integer, found "
                                  f"{value!r}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation {self.activation!r} is not one of {ACTIVATIONS}")
        if self.activation in GATED_ONLY and len(self.ffn_parts) != 3:
            raise ConfigError(f"activation {self.activation!r} needs a gated FFN; "
                              f"{self.model_type} has none")
        t = self.activation_thresholds
        if t is not None:
            if self.activation != "silu":
                raise ConfigError(f"field {THRESHOLDS_FIELD!r} is for SiLU (SwiGLU) FFNs; this "
                                  f"model's activation is {self.activation!r}")
            if (not isinstance(t, tuple) or len(t) != self.num_hidden_layers
                    or not all(isinstance(x, float) and math.isfinite(x) and x >= 0 for x in t)):
                raise ConfigError(f"field {THRESHOLDS_FIELD!r} must hold one finite threshold "
                                  f">= 0 per layer ({self.num_hidden_layers}), found {t!r}")

    def threshold(self, layer: int) -> float | None:
        """Layer ``layer``'s activation threshold (SwiGLU), or None where there is none."""
        return None if self.activation_thresholds is None else self.activation_thresholds[layer]

    @functools.cached_property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads

    @functools.cached_property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @functools.cached_property
    def max_sequence(self) -> int:
        """The longest sequence (prompt and new tokens) computed exactly."""
        return self.max_position_embeddings

    @functools.cached_property
    def sequence_limit(self) -> str:
        """``max_sequence`` and the field it comes from, for error messages."""
        return f"max_position_embeddings {self.max_position_embeddings}"

    @functools.cached_property
    def bundle_width(self) -> int:
        """Values in one flash row: one ``hidden_size`` slice per FFN part."""
        return len(self.ffn_parts) * self.hidden_size

    @classmethod
    def from_hf_config(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """The config of a Hugging Face ``config.json`` dict, of whichever family it names."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, found {type(d).__name__}")
        model_type = d.get("model_type")
        family = FAMILIES.get(model_type)
        if family is None:
            raise ConfigError(f"{source}: field 'model_type' is {model_type!r}; flashjax "
                              f"supports {sorted(FAMILIES)}")
        try:
            return family._from_hf(d, source)
        except ConfigError as e:
            message = str(e)
            raise ConfigError(message if message.startswith(source) else f"{source}: {message}"
                              ) from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_config(d, source=str(path))

    def to_hf_config(self) -> dict[str, Any]:
        raise NotImplementedError


def _require(d: dict[str, Any], source: str, fields: tuple[str, ...]) -> None:
    missing = [k for k in fields if k not in d]
    if missing:
        raise ConfigError(f"{source}: missing required field(s) {missing}")


def _token_id(d: dict[str, Any], key: str, default: int) -> int:
    value = d.get(key, default)
    if isinstance(value, list):  # newer HF configs allow several eos ids
        value = value[0]
    return default if value is None else int(value)


# HF fields of an OPT config whose value must be exactly this for flashjax to run the model.
_OPT_REQUIRED_VALUES = {
    "activation_function": "relu",  # the whole method rests on ReLU sparsity
    "enable_bias": True,
    "layer_norm_elementwise_affine": True,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class OPTConfig(ModelConfig):
    """An OPT decoder (ReLU FFN), as in ``transformers.OPTConfig``."""

    word_embed_proj_dim: int  # embedding width; != hidden_size adds project_in/project_out
    do_layer_norm_before: bool  # True: pre-LN (most OPT sizes); False: post-LN (OPT-350m)
    remove_final_layer_norm: bool = False  # HF's _remove_final_layer_norm (old OPT-350m ports)
    layer_norm_eps: float = 1e-5  # torch.nn.LayerNorm's default, which OPT uses

    family: ClassVar[str] = "opt"
    ffn_parts: ClassVar[tuple[str, ...]] = ("fc1", "fc2")
    ffn_bias: ClassVar[bool] = True
    _POSITIVE: ClassVar[tuple[str, ...]] = ModelConfig._POSITIVE + ("word_embed_proj_dim",)

    # OPT's learned positions are offset by 2 (ids 0 and 1 were reserved for padding in fairseq).
    POSITION_OFFSET: ClassVar[int] = 2

    def __post_init__(self):
        super().__post_init__()
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}")

    @functools.cached_property
    def has_projections(self) -> bool:
        return self.word_embed_proj_dim != self.hidden_size

    @functools.cached_property
    def has_final_layer_norm(self) -> bool:
        # HF builds the decoder's final LayerNorm only for pre-LN models.
        return self.do_layer_norm_before and not self.remove_final_layer_norm

    @classmethod
    def _from_hf(cls, d: dict[str, Any], source: str) -> OPTConfig:
        for field, wanted in _OPT_REQUIRED_VALUES.items():
            if field in d and d[field] != wanted:
                raise ConfigError(
                    f"{source}: field {field!r} is {d[field]!r}; flashjax supports only {wanted!r}")
        _require(d, source, ("vocab_size", "hidden_size", "num_hidden_layers", "ffn_dim",
                             "num_attention_heads", "max_position_embeddings"))
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            num_hidden_layers=d["num_hidden_layers"],
            ffn_dim=d["ffn_dim"],
            num_attention_heads=d["num_attention_heads"],
            max_position_embeddings=d["max_position_embeddings"],
            word_embed_proj_dim=d.get("word_embed_proj_dim") or d["hidden_size"],
            do_layer_norm_before=bool(d.get("do_layer_norm_before", True)),
            remove_final_layer_norm=bool(d.get("_remove_final_layer_norm", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            pad_token_id=_token_id(d, "pad_token_id", 1),
            bos_token_id=_token_id(d, "bos_token_id", 2),
            eos_token_id=_token_id(d, "eos_token_id", 2),
        )

    def to_hf_config(self) -> dict[str, Any]:
        return {
            "model_type": "opt",
            "architectures": ["OPTForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "ffn_dim": self.ffn_dim,
            "num_attention_heads": self.num_attention_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "word_embed_proj_dim": self.word_embed_proj_dim,
            "do_layer_norm_before": self.do_layer_norm_before,
            "_remove_final_layer_norm": self.remove_final_layer_norm,
            "tie_word_embeddings": self.tie_word_embeddings,
            "activation_function": "relu",
            "enable_bias": True,
            "layer_norm_elementwise_affine": True,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }


# The HF classes of each Llama-family model type.
_LLAMA_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                        "qwen2": "Qwen2ForCausalLM"}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
# Field flashjax adds to a Hugging Face config for dReLU models (whose HF code is custom).
FFN_ACTIVATION_FIELD = "ffn_activation"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig(ModelConfig):
    """A Llama-architecture decoder with a gated ReLU FFN: RMSNorm, rotary positions,
    grouped-query attention. Llama (ReluLLaMA, ProSparse), Mistral and Qwen2 checkpoints."""

    num_kv_heads: int  # HF num_key_value_heads: < heads is GQA, 1 is MQA
    head_size: int  # HF head_dim, or hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # HF rope_scaling as sorted (key, value) pairs (hashable), None for plain RoPE
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    qkv_bias: bool = False  # Llama attention_bias; always on in Qwen2
    o_bias: bool = False  # Llama attention_bias; off in Qwen2
    sliding_window: int | None = None  # Mistral/Qwen2: sequences are held within it
    model_type: str = "llama"

    family: ClassVar[str] = "llama"
    ffn_parts: ClassVar[tuple[str, ...]] = ("gate", "up", "down")
    ffn_bias: ClassVar[bool] = False
    _POSITIVE: ClassVar[tuple[str, ...]] = ModelConfig._POSITIVE + ("num_kv_heads", "head_size")

    def __post_init__(self):
        super().__post_init__()
        if self.num_attention_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads {self.num_attention_heads} is not a multiple "
                              f"of num_key_value_heads {self.num_kv_heads}")
        if self.head_size % 2:
            raise ConfigError(f"head_dim {self.head_size} must be even for rotary embeddings")
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 1):
            raise ConfigError(f"rope_theta {self.rope_theta} must be a finite number above 1 "
                              f"(the rotary base, 10000 by default)")
        if self.model_type not in _LLAMA_ARCHITECTURES:
            raise ConfigError(f"model_type {self.model_type!r} is not one of "
                              f"{sorted(_LLAMA_ARCHITECTURES)}")
        rope_frequencies(self)  # refuses an unknown or incomplete rope_scaling now

    @functools.cached_property
    def num_key_value_heads(self) -> int:
        return self.num_kv_heads

    @functools.cached_property
    def head_dim(self) -> int:
        return self.head_size

    @functools.cached_property
    def rope_type(self) -> str:
        scaling = dict(self.rope_scaling or ())
        return scaling.get("rope_type", scaling.get("type", "default"))

    @classmethod
    def _from_hf(cls, d: dict[str, Any], source: str) -> LlamaConfig:
        model_type = d["model_type"]
        act = d.get("hidden_act", "silu")
        if act not in ("relu", "silu"):
            raise ConfigError(
                f"{source}: field 'hidden_act' is {act!r}; flashjax runs Llama-family models "
                f"with 'relu' (ReluLLaMA, ProSparse; dReLU with --activation drelu) or 'silu' "
                f"(SwiGLU: sparse after `flashjax calibrate`, or relufied with "
                f"scripts/relufy.py)")
        activation = d.get(FFN_ACTIVATION_FIELD, act)
        thresholds = d.get(THRESHOLDS_FIELD)
        if thresholds is not None:
            if not isinstance(thresholds, list) or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) for x in thresholds):
                raise ConfigError(f"{source}: field {THRESHOLDS_FIELD!r} is {thresholds!r}; "
                                  f"expected a list of numbers, one per layer")
            thresholds = tuple(float(x) for x in thresholds)
        if d.get("mlp_bias"):
            raise ConfigError(f"{source}: field 'mlp_bias' is True; flashjax supports Llama "
                              f"FFNs without biases only")
        if d.get("pretraining_tp", 1) not in (1, None):
            log.info("%s: pretraining_tp %s only changes how HF splits matmuls; ignored",
                     source, d["pretraining_tp"])
        _require(d, source, ("vocab_size", "hidden_size", "num_hidden_layers",
                             "intermediate_size", "num_attention_heads",
                             "max_position_embeddings"))
        heads = d["num_attention_heads"]
        window = d.get("sliding_window")
        if model_type == "qwen2" and not d.get("use_sliding_window", False):
            window = None  # Qwen2 keeps the field but attends fully unless told otherwise
        if model_type == "llama":
            window = None
        max_pos = d["max_position_embeddings"]
        if window is not None:
            if not isinstance(window, int) or window <= 0:
                raise ConfigError(f"{source}: field 'sliding_window' is {window!r}; expected "
                                  f"null or a positive integer")
            if window < max_pos:
                log.warning("%s: sliding_window %d < max_position_embeddings %d: sequences are "
                            "limited to %d tokens, within which sliding-window attention is "
                            "full attention", source, window, max_pos, window)
        # transformers >= 5 writes rope_parameters (with rope_theta inside); older versions
        # rope_theta beside rope_scaling
        field = "rope_parameters" if d.get("rope_parameters") is not None else "rope_scaling"
        scaling = d.get(field)
        if scaling is not None and not isinstance(scaling, dict):
            raise ConfigError(f"{source}: field {field!r} is {scaling!r}; expected an object "
                              f"or null")
        scaling = dict(scaling or {})
        theta = scaling.pop("rope_theta", d.get("rope_theta", 10000.0))
        if scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = {}
        bias = bool(d.get("attention_bias", False))
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            num_hidden_layers=d["num_hidden_layers"],
            ffn_dim=d["intermediate_size"],
            num_attention_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_size=d.get("head_dim") or d["hidden_size"] // heads,
            max_position_embeddings=max_pos,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
            qkv_bias=True if model_type == "qwen2" else bias,
            o_bias=False if model_type == "qwen2" else bias,
            sliding_window=window,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            pad_token_id=_token_id(d, "pad_token_id", 0),
            bos_token_id=_token_id(d, "bos_token_id", 1),
            eos_token_id=_token_id(d, "eos_token_id", 2),
            activation=activation,
            activation_thresholds=thresholds,
            model_type=model_type,
        )

    @functools.cached_property
    def max_sequence(self) -> int:
        """The longest sequence computed exactly: within the sliding window, if any."""
        return min(self.max_position_embeddings,
                   self.sliding_window or self.max_position_embeddings)

    @functools.cached_property
    def sequence_limit(self) -> str:
        if self.max_sequence < self.max_position_embeddings:
            return f"sliding_window {self.sliding_window}"
        return f"max_position_embeddings {self.max_position_embeddings}"

    def to_hf_config(self) -> dict[str, Any]:
        d = {
            "model_type": self.model_type,
            "architectures": [_LLAMA_ARCHITECTURES[self.model_type]],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "intermediate_size": self.ffn_dim,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "hidden_act": "silu" if self.activation == "silu" else "relu",
            "tie_word_embeddings": self.tie_word_embeddings,
            "sliding_window": self.sliding_window,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if self.model_type == "llama":
            d |= {"attention_bias": self.qkv_bias, "mlp_bias": False}
        if self.model_type == "qwen2":
            d |= {"use_sliding_window": self.sliding_window is not None}
        if self.activation == "drelu":
            d[FFN_ACTIVATION_FIELD] = self.activation
        if self.activation_thresholds is not None:
            d[THRESHOLDS_FIELD] = list(self.activation_thresholds)
        return d


def rope_frequencies(cfg: LlamaConfig):
    """The rotary inverse frequencies [head_dim / 2] (numpy float64) of ``cfg``'s RoPE with
    its ``rope_scaling``, as Hugging Face computes them.

    "dynamic" (NTK) scaling changes the frequencies only for sequences longer than
    ``max_position_embeddings``, which flashjax never runs (it refuses them), so within the
    sequences it runs "dynamic" is plain RoPE."""
    import numpy as np

    dim = cfg.head_size
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    scaling = dict(cfg.rope_scaling or ())
    kind = cfg.rope_type
    if kind not in ROPE_TYPES:
        raise ConfigError(f"field 'rope_scaling' has type {kind!r}; flashjax supports "
                          f"{ROPE_TYPES}")

    def need(*keys):
        missing = [k for k in keys if k not in scaling]
        if missing:
            raise ConfigError(f"field 'rope_scaling' of type {kind!r} lacks {missing}")
        return [float(scaling[k]) for k in keys]

    if kind == "linear":
        (factor,) = need("factor")
        return inv / factor
    if kind == "dynamic":
        need("factor")
        return inv
    if kind == "llama3":
        factor, low, high, old = need("factor", "low_freq_factor", "high_freq_factor",
                                      "original_max_position_embeddings")
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        return np.where(medium, smoothed, scaled)
    return inv


FAMILIES: dict[str, type[ModelConfig]] = {"opt": OPTConfig, "llama": LlamaConfig,
                                          "mistral": LlamaConfig, "qwen2": LlamaConfig}
