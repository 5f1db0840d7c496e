"""Activation sparsity, the window curve and rows loaded per token of a converted model.

    python scripts/analyze_model.py MODEL_DIR --text HELDOUT [--tokens 4096] [--out DIR]

On held-out text, from the dense model's own activations: the fraction of FFN neurons active
per token in each layer, and for windows of k tokens the neurons aggregated over the window
and the new neurons a token adds to it (the curve the paper plots). Then, with the flash
engine (lowrank predictors when the model has them), the rows actually loaded from flash
per token against k. Writes window_curve.png and analysis.json into --out.
"""

import argparse
import json
from pathlib import Path

import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import flashjax  # noqa: E402
from flashjax.predictor.collect import ffn_activations  # noqa: E402
from flashjax.predictor.text import sequences  # noqa: E402

WINDOWS = (1, 2, 3, 4, 6, 8, 12, 16)


def activity(model, text, tokens, seq_len):
    """Per layer, [T, N] bool activity over held-out sequences (list of [S, N] per sequence)."""
    cfg = model.cfg
    out = [[] for _ in range(cfg.num_hidden_layers)]
    seqs = list(sequences(text, model.tokenizer, seq_len=seq_len, bos_id=cfg.bos_token_id,
                          eos_id=cfg.eos_token_id, max_tokens=tokens))
    for seq in seqs:
        _, bits, _ = ffn_activations(cfg, model.params, jnp.asarray(seq[None]))
        bits = np.asarray(bits)
        for layer in range(cfg.num_hidden_layers):
            out[layer].append(np.unpackbits(bits[layer, 0], axis=-1, count=cfg.ffn_dim,
                                            bitorder="little").astype(bool))
    return out, seqs


def window_curve(acts: list[np.ndarray], k: int) -> tuple[float, float]:
    """(aggregated fraction, new fraction per token) for window k, averaged over tokens."""
    agg, new = [], []
    for a in acts:  # one sequence [S, N]
        counts = np.cumsum(np.vstack([np.zeros((1, a.shape[1]), int), a]), axis=0)
        for t in range(k, len(a)):
            window = counts[t + 1] - counts[t + 1 - k] > 0  # tokens t-k+1..t
            before = counts[t] - counts[t - k + 1] > 0 if k > 1 else np.zeros(a.shape[1], bool)
            agg.append(window.mean())
            new.append((a[t] & ~before).mean())
    return float(np.mean(agg)), float(np.mean(new))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--text", required=True)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--flash-tokens", type=int, default=512)
    parser.add_argument("--dram-budget", default="50%")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    model = flashjax.load(args.model_dir, progress=False)
    per_layer, seqs = activity(model, args.text, args.tokens, args.seq_len)
    sparsity = [float(np.mean([a.mean() for a in acts])) for acts in per_layer]
    curve = {k: [window_curve(acts, k) for acts in per_layer] for k in WINDOWS}

    loaded = {}
    flash_seq = np.concatenate(seqs)[:args.flash_tokens]
    for k in WINDOWS:
        flash = flashjax.load(args.model_dir, dram_budget=args.dram_budget, window=k)
        _, state = flash.logits(flash_seq, return_state=True)
        stats = flash.report(state)
        rows = np.array(stats["rows_read_per_token"][8:])  # after the window has formed
        loaded[k] = {"rows_loaded_per_token": float(rows.mean()),
                     "rows_needed_per_token": stats["rows_needed"] / stats["tokens"],
                     "rows_streamed": stats["rows_streamed"], "predictor": stats["predictor"],
                     "capacity": stats["capacity"]}
        print(f"k={k}: {loaded[k]['rows_loaded_per_token']:.1f} rows loaded per token "
              f"(needed {loaded[k]['rows_needed_per_token']:.1f}, all layers)")

    n_layers = len(per_layer)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ks = list(WINDOWS)
    for layer in range(n_layers):
        axes[0].plot(ks, [100 * curve[k][layer][0] for k in ks], marker="o", label=f"layer {layer}")
        axes[1].plot(ks, [100 * curve[k][layer][1] for k in ks], marker="o", label=f"layer {layer}")
    axes[0].set(xlabel="window size k (tokens)", ylabel="% of neurons",
                title="neurons aggregated over the window")
    axes[1].set(xlabel="window size k (tokens)", ylabel="% of neurons",
                title="new neurons per token (to load)")
    axes[2].plot(ks, [loaded[k]["rows_loaded_per_token"] for k in ks], marker="o",
                 label="loaded from flash")
    axes[2].plot(ks, [loaded[k]["rows_needed_per_token"] for k in ks], marker="s",
                 label="predicted active")
    axes[2].set(xlabel="window size k (tokens)", ylabel="rows per token (all layers)",
                title=f"flash engine, budget {args.dram_budget}")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "window_curve.png", dpi=120)
    result = {"tokens": int(sum(len(s) for s in seqs)), "active_fraction_per_layer": sparsity,
              "window_curve": {k: {"aggregated_fraction": [c[0] for c in v],
                                   "new_fraction": [c[1] for c in v]} for k, v in curve.items()},
              "flash_rows_per_token": loaded}
    (args.out / "analysis.json").write_text(json.dumps(result, indent=1))
    print("active fraction per layer:", " ".join(f"{s:.4f}" for s in sparsity))
    print("new neurons per token (k=1, 4):",
          [f"{curve[1][i][1]:.4f}/{curve[4][i][1]:.4f}" for i in range(n_layers)])


if __name__ == "__main__":
    main()
