"""Model configuration read from a Hugging Face ``config.json``.

``ModelConfig`` is the static description jit specialises on: frozen and hashable. It accepts
only what flashjax can run and refuses anything else with an error that names the field, the
value found and what is supported.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A ``config.json`` that flashjax cannot run."""


# HF fields whose value must be exactly this for flashjax to run the model.
_REQUIRED_VALUES = {
    "activation_function": "relu",  # the whole method rests on ReLU sparsity
    "enable_bias": True,
    "layer_norm_elementwise_affine": True,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """An OPT decoder (ReLU FFN), as in ``transformers.OPTConfig``."""

    vocab_size: int
    hidden_size: int  # d_model: width of the residual stream, attention and FFN input
    num_hidden_layers: int
    ffn_dim: int  # neurons per FFN layer (rows of the flash bundle store)
    num_attention_heads: int
    max_position_embeddings: int
    word_embed_proj_dim: int  # embedding width; != hidden_size adds project_in/project_out
    do_layer_norm_before: bool  # True: pre-LN (most OPT sizes); False: post-LN (OPT-350m)
    remove_final_layer_norm: bool = False  # HF's _remove_final_layer_norm (old OPT-350m ports)
    tie_word_embeddings: bool = True
    layer_norm_eps: float = 1e-5  # torch.nn.LayerNorm's default, which OPT uses
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2
    model_type: str = "opt"

    # OPT's learned positions are offset by 2 (ids 0 and 1 were reserved for padding in fairseq).
    POSITION_OFFSET = 2

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "ffn_dim",
                    "num_attention_heads", "max_position_embeddings", "word_embed_proj_dim")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {name!r} must be a positive integer, found {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}")

    @functools.cached_property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @functools.cached_property
    def has_projections(self) -> bool:
        return self.word_embed_proj_dim != self.hidden_size

    @functools.cached_property
    def has_final_layer_norm(self) -> bool:
        # HF builds the decoder's final LayerNorm only for pre-LN models.
        return self.do_layer_norm_before and not self.remove_final_layer_norm

    @functools.cached_property
    def bundle_width(self) -> int:
        """Values in one flash row: up-projection column i next to down-projection row i."""
        return 2 * self.hidden_size

    @classmethod
    def from_hf_config(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        model_type = d.get("model_type")
        if model_type != "opt":
            raise ConfigError(f"{source}: field 'model_type' is {model_type!r}; flashjax supports 'opt'")
        for field, wanted in _REQUIRED_VALUES.items():
            if field in d and d[field] != wanted:
                raise ConfigError(
                    f"{source}: field {field!r} is {d[field]!r}; flashjax supports only {wanted!r}")
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "ffn_dim",
                               "num_attention_heads", "max_position_embeddings") if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing required field(s) {missing}")
        try:
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
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

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


def _token_id(d: dict[str, Any], key: str, default: int) -> int:
    value = d.get(key, default)
    if isinstance(value, list):  # newer HF configs allow several eos ids
        value = value[0]
    return default if value is None else int(value)
