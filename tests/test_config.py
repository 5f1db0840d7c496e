"""ModelConfig reads HF configs and refuses what flashjax cannot run."""

from __future__ import annotations

import pytest

from flashjax.config import ConfigError, ModelConfig
from flashjax.testing import tiny_llama_config, tiny_opt_config


def test_round_trip():
    cfg = ModelConfig.from_hf_config(tiny_opt_config(word_embed_proj_dim=16))
    assert cfg.has_projections and cfg.head_dim == 8 and cfg.bundle_width == 64
    assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg
    assert hash(cfg) == hash(ModelConfig.from_hf_config(cfg.to_hf_config()))


@pytest.mark.parametrize("field,value,message", [
    ("activation_function", "gelu", "'activation_function' is 'gelu'; flashjax supports only 'relu'"),
    ("enable_bias", False, "'enable_bias' is False"),
    ("model_type", "gpt2", "'model_type' is 'gpt2'"),
    ("num_attention_heads", 5, "hidden_size 32 is not divisible by num_attention_heads 5"),
    ("ffn_dim", 0, "'ffn_dim' must be a positive integer, found 0"),
])
def test_refuses_unsupported(field, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        ModelConfig.from_hf_config({**tiny_opt_config(), field: value}, source="x/config.json")


def test_missing_field_is_named():
    cfg = tiny_opt_config()
    del cfg["ffn_dim"]
    with pytest.raises(ConfigError, match=r"x/config.json: missing required field\(s\) \['ffn_dim'\]"):
        ModelConfig.from_hf_config(cfg, source="x/config.json")


@pytest.mark.parametrize("theta", [0.0, -10000.0, 1.0, float("inf")])
def test_rope_theta_must_be_a_base_above_one(theta):
    with pytest.raises(ConfigError, match=r"rope_theta .* must be a finite number above 1"):
        ModelConfig.from_hf_config(tiny_llama_config(rope_theta=theta))
