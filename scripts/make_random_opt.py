"""Write a randomly initialised OPT or ReLU Llama-family checkpoint in Hugging Face's layout
(numpy only).

    python scripts/make_random_opt.py OUT_DIR [--preset tiny|opt-125m|opt-350m|opt-1.3b|opt-6.7b|
        llama-tiny|llama-2-7b|mistral-7b] [--shard-layers N] [--ffn-active 0.05]

The weights are random: useful to try the pipeline and to measure conversion and I/O at real
shapes, not to read the text it generates.
"""

import argparse

from flashjax.testing import synthetic_hf_checkpoint, tiny_llama_config, tiny_opt_config

PRESETS = {
    "tiny": tiny_opt_config(vocab_size=512, hidden_size=64, num_hidden_layers=2, ffn_dim=256),
    "opt-125m": tiny_opt_config(vocab_size=50272, hidden_size=768, num_hidden_layers=12,
                                ffn_dim=3072, num_attention_heads=12, word_embed_proj_dim=768,
                                max_position_embeddings=2048),
    "opt-350m": tiny_opt_config(vocab_size=50272, hidden_size=1024, num_hidden_layers=24,
                                ffn_dim=4096, num_attention_heads=16, word_embed_proj_dim=512,
                                max_position_embeddings=2048, do_layer_norm_before=False),
    "opt-1.3b": tiny_opt_config(vocab_size=50272, hidden_size=2048, num_hidden_layers=24,
                                ffn_dim=8192, num_attention_heads=32, word_embed_proj_dim=2048,
                                max_position_embeddings=2048),
    "opt-6.7b": tiny_opt_config(vocab_size=50272, hidden_size=4096, num_hidden_layers=32,
                                ffn_dim=16384, num_attention_heads=32, word_embed_proj_dim=4096,
                                max_position_embeddings=2048),
    "llama-tiny": tiny_llama_config(vocab_size=512, hidden_size=64, num_hidden_layers=2,
                                    intermediate_size=256),
    # ReluLLaMA-2-7B / ProSparse-Llama-2-7B: Llama-2-7B's shape with ReLU
    "llama-2-7b": tiny_llama_config(vocab_size=32000, hidden_size=4096, num_hidden_layers=32,
                                    intermediate_size=11008, num_attention_heads=32,
                                    num_key_value_heads=32, max_position_embeddings=4096,
                                    rms_norm_eps=1e-5),
    # TurboSparse-Mistral-7B's shape (grouped-query attention, 14336 neurons); convert with
    # --activation drelu for its FFN
    "mistral-7b": tiny_llama_config("mistral", vocab_size=32000, hidden_size=4096,
                                    num_hidden_layers=32, intermediate_size=14336,
                                    num_attention_heads=32, num_key_value_heads=8,
                                    max_position_embeddings=32768, rope_theta=1000000.0,
                                    rms_norm_eps=1e-5),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    parser.add_argument("--shard-layers", type=int, default=None,
                        help="write sharded safetensors of this many layers each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ffn-active", type=float, default=None,
                        help="(OPT) shift fc1 biases so that about this fraction of neurons fires")
    args = parser.parse_args()
    synthetic_hf_checkpoint(args.out_dir, PRESETS[args.preset], seed=args.seed, dtype=args.dtype,
                            shard_layers=args.shard_layers, ffn_active=args.ffn_active)
    print(f"wrote {args.out_dir} ({args.preset}, {args.dtype})")


if __name__ == "__main__":
    main()
