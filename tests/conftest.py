"""Shared fixtures: tiny random OPT checkpoints made with transformers and converted once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from flashjax.testing import tiny_opt_config

# The three shapes every parity test covers.
VARIANTS = {
    "pre_ln": tiny_opt_config(),
    # OPT-350m's shape: post-LN, no final LayerNorm, 16-wide embeddings projected to 32.
    "post_ln_proj": tiny_opt_config(do_layer_norm_before=False, word_embed_proj_dim=16),
    # Odd sizes: 6 heads of width 8, 200 neurons, 101 tokens, 3 layers.
    "odd": tiny_opt_config(vocab_size=101, hidden_size=48, num_attention_heads=6, ffn_dim=200,
                           num_hidden_layers=3),
}


@dataclasses.dataclass
class Converted:
    hf_dir: Path
    model_dir: Path
    reference: object  # transformers.OPTForCausalLM, float32, eager attention


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """converted(variant, dtype=None) -> Converted, built once per (variant, dtype)."""
    import flashjax
    from flashjax.testing import random_hf_checkpoint

    made: dict = {}

    def get(variant: str, dtype: str | None = None) -> Converted:
        if variant not in made:
            root = tmp_path_factory.mktemp(variant)
            ref = random_hf_checkpoint(root / "hf", VARIANTS[variant],
                                       seed=sorted(VARIANTS).index(variant))
            made[variant] = (root, ref)
        root, ref = made[variant]
        out = root / f"flashjax-{dtype or 'source'}"
        if not out.exists():
            flashjax.convert(root / "hf", out, dtype=dtype, progress=False)
        return Converted(root / "hf", out, ref)

    return get
