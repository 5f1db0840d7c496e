"""The OPT decoder as a pure-functional Flax module (jitted entry points: ``decoder``).

Shape legend: B batch, S tokens in this call, V vocabulary, T KV-cache slots.
"""

from __future__ import annotations

import flax.linen as nn

from flashjax.config import OPTConfig
from flashjax.model.layers import DecoderLayer, KVCache, decode_layers, lm_logits


class OPT(nn.Module):
    """Embeddings, ``num_hidden_layers`` decoder layers, final norm and the tied LM head."""

    cfg: OPTConfig

    def setup(self):
        cfg = self.cfg
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.word_embed_proj_dim)
        self.embed_positions = nn.Embed(
            cfg.max_position_embeddings + cfg.POSITION_OFFSET, cfg.hidden_size)
        if cfg.has_projections:
            self.project_in = nn.Dense(cfg.hidden_size, use_bias=False)
            self.project_out = nn.Dense(cfg.word_embed_proj_dim, use_bias=False)
        self.layers = [DecoderLayer(cfg, name=f"layers_{i}") for i in range(cfg.num_hidden_layers)]
        if cfg.has_final_layer_norm:
            self.final_layer_norm = nn.LayerNorm(epsilon=cfg.layer_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False)

    def embed(self, tokens, positions):
        """tokens, positions: [B, S] int -> h [B, S, D]."""
        h = self.embed_tokens(tokens)
        if self.cfg.has_projections:
            h = self.project_in(h)
        return h + self.embed_positions(positions + self.cfg.POSITION_OFFSET)

    def head(self, h):
        """h [B, S, D] -> logits [B, S, V] in float32."""
        if self.cfg.has_final_layer_norm:
            h = self.final_layer_norm(h)
        if self.cfg.has_projections:
            h = self.project_out(h)
        return lm_logits(self, h)

    def __call__(self, tokens, positions, token_valid, cache: KVCache, ffn=None):
        return decode_layers(self, tokens, positions, token_valid, cache, ffn)
