"""Would reading layer l+1's rows early, predicted from layer l's FFN input, pay?

    python scripts/prefetch_estimate.py [MODEL_DIR] --text data/corpus/heldout.txt \\
        --tokens 4096 --window 4 --out docs/bench/prefetch

The engine reads a layer's rows once its own predictor has run on its own FFN input (the
paper's design). A prefetch would run layer l+1's predictor on layer l's FFN input, so that
l+1's reads start a layer earlier, under layer l's FFN and l+1's attention. This measures,
on held-out text through the dense model, with the trained predictors and a window of k
tokens (a buffer that holds the window), per layer l+1 >= 1:

* recall: the share of the rows l+1 must read for a token (predicted now, not in the last k
  tokens' sets) that the early prediction would already have read;
* waste: the share of the early reads that l+1's own prediction does not need (read for
  nothing, unless a later token asks for them);
* the same for a prefetch from the hidden state after layer l (l+1's FFN norm applied to it,
  skipping only l+1's attention), the latest point at which a read could still overlap it.

Results (JSON, a table and a plot) go to --out. Shape legend: T tokens, L layers, N neurons,
D model width.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import flashjax
from flashjax.model import decoder
from flashjax.model.layers import KVCache, run_layers
from flashjax.predictor.model import Predictors, predictor_logits
from flashjax.predictor.text import sequences


def _ffn_norm(layer):
    """The norm that makes a (pre-norm) layer's FFN input from its residual stream."""
    return getattr(layer, "post_attention_layernorm", None) or layer.final_layer_norm


def _trace(model, tokens, positions, valid, cache):
    """Every layer's FFN input, and the early guess of it: the next layer's FFN norm applied
    to the residual stream after this layer (the next layer's attention skipped)."""
    ins, guesses = [], []
    valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, valid, cache.index, axis=1)

    def attend(i, h, kv):
        layer = model.layers[i]
        if i:
            guesses.append(_ffn_norm(layer)(h))
        h, ffn_in, _, _ = layer.attend(h, cache.keys[i], cache.values[i], valid, cache.index,
                                       positions)
        ins.append(ffn_in)
        return h, ffn_in, kv

    run_layers(len(model.layers), model.embed(tokens, positions), None, attend=attend,
               ffn=lambda i, x: model.layers[i].ffn(x),
               finish=lambda i, h, out: model.layers[i].finish(h, out))
    return jnp.stack(ins), jnp.stack(guesses)


def activations(cfg, params, tokens):
    """tokens [B, S] -> (ffn_in [L, B, S, D], next-norm guesses [L - 1, B, S, D])."""
    b, s = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    cache = KVCache.init(cfg, b, s, jnp.float32)
    return decoder.module(cfg).apply({"params": params}, tokens, positions,
                                     jnp.ones((b, s), bool), cache, method=_trace)


def new_rows(sets: np.ndarray, window: int) -> np.ndarray:
    """sets [T, N] bool (a layer's needed rows per token) -> [T, N]: needed and not needed by
    any of the ``window`` tokens before (what a buffer holding the window must read)."""
    held = np.zeros_like(sets)
    for k in range(1, window + 1):
        held[k:] |= sets[:-k]
    return sets & ~held, held


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", nargs="?", default=None,
                   help="a converted model with trained predictors (default: the shipped one)")
    p.add_argument("--text", default="data/corpus/heldout.txt")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--out", default="docs/bench/prefetch")
    args = p.parse_args(argv)

    if args.model_dir is None:
        from flashjax.shipped import default_model_dir
        args.model_dir = default_model_dir()
    model = flashjax.load(args.model_dir, progress=False)
    cfg = model.cfg
    preds = Predictors.load(args.model_dir, cfg.num_hidden_layers)
    seqs = list(sequences(args.text, model.tokenizer, seq_len=args.seq_len,
                          bos_id=cfg.bos_token_id, eos_id=cfg.eos_token_id,
                          max_tokens=args.tokens))
    if not seqs:
        sys.exit(f"{args.text}: too short for one {args.seq_len}-token sequence")
    L = cfg.num_hidden_layers
    own = [[] for _ in range(L)]  # per layer [S, N] bool chunks: its own prediction
    early = [[] for _ in range(L)]  # layer l's predictor on layer l-1's FFN input
    late = [[] for _ in range(L)]  # on l's FFN norm of the hidden state after l-1
    if cfg.family == "opt" and not cfg.do_layer_norm_before:
        sys.exit("a post-norm OPT: its FFN input is not a norm of the residual stream")
    step = jax.jit(lambda tokens: activations(cfg, model.params, tokens))
    for seq in tqdm(seqs, desc="sequences"):
        ffn_in, hidden = step(jnp.asarray(seq[None]))
        for layer in range(L):
            th = preds.thresholds[layer]
            pl = preds.params[layer]
            own[layer].append(np.asarray(predictor_logits(pl, ffn_in[layer, 0]) >= th))
            if layer == 0:
                continue
            early[layer].append(np.asarray(predictor_logits(pl, ffn_in[layer - 1, 0]) >= th))
            late[layer].append(np.asarray(predictor_logits(pl, hidden[layer - 1, 0]) >= th))
    rows = []
    for layer in range(1, L):
        sets = np.concatenate(own[layer])
        fresh, held = new_rows(sets, args.window)
        row = {"layer": layer, "needed_per_token": float(sets.sum(1).mean()),
               "new_per_token": float(fresh.sum(1).mean())}
        for name, guess in (("from_ffn_input", early[layer]), ("from_hidden", late[layer])):
            guess = np.concatenate(guess) & ~held  # what a prefetch would read
            hit = (guess & fresh).sum()
            wasted = (guess & ~sets).sum()
            row[name] = {"recall": float(hit / max(fresh.sum(), 1)),
                         "waste": float(wasted / max(guess.sum(), 1)),
                         "reads_per_token": float(guess.sum(1).mean()),
                         "wasted_per_token": float(wasted / len(sets))}
        rows.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    total_new = sum(r["new_per_token"] for r in rows)
    summary = {name: {"recall": sum(r[name]["recall"] * r["new_per_token"] for r in rows)
                      / max(total_new, 1e-9),
                      "waste": sum(r[name]["wasted_per_token"] for r in rows)
                      / max(sum(r[name]["reads_per_token"] for r in rows), 1e-9)}
               for name in ("from_ffn_input", "from_hidden")}
    command = ["python", "scripts/prefetch_estimate.py", *(argv or sys.argv[1:])]
    result = {"command": " ".join(command),
              "model": str(args.model_dir), "tokens": int(sum(len(s) for s in seqs)),
              "window": args.window, "layers": rows, "summary": summary}
    (out / "prefetch.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| layer | new rows/token | recall (l's FFN input) | waste | recall (hidden after l) "
             "| waste |", "|---|---|---|---|---|---|"]
    for r in rows:
        a, b = r["from_ffn_input"], r["from_hidden"]
        lines.append(f"| {r['layer']} | {r['new_per_token']:.1f} | {a['recall']:.0%} | "
                     f"{a['waste']:.0%} | {b['recall']:.0%} | {b['waste']:.0%} |")
    lines.append(f"| all (recall per new row, waste per early read) | {total_new:.1f} | "
                 f"{summary['from_ffn_input']['recall']:.0%} | "
                 f"{summary['from_ffn_input']['waste']:.0%} | "
                 f"{summary['from_hidden']['recall']:.0%} | "
                 f"{summary['from_hidden']['waste']:.0%} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "prefetch.png")
    print("\n".join(lines))
    print(f"wrote {out}/prefetch.json, table.md, prefetch.png", file=sys.stderr)
    return 0


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [r["layer"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for (name, label), color in zip((("from_ffn_input", "from layer l's FFN input"),
                                     ("from_hidden", "from the hidden state after layer l")),
                                    ("tab:blue", "tab:orange")):
        ax.plot(layers, [r[name]["recall"] for r in rows], "o-", color=color,
                label=f"recall, {label}")
        ax.plot(layers, [r[name]["waste"] for r in rows], "x--", color=color,
                label=f"waste, {label}")
    ax.set_xticks(layers)
    ax.set_xlabel("layer l+1 (rows read early)")
    ax.set_ylim(0, 1)
    ax.set_ylabel("share")
    ax.set_title("Prefetching the next layer's new rows")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
