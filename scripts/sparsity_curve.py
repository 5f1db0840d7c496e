"""Perplexity against the fraction of FFN rows a token needs: a SwiGLU model calibrated to
several sparsities (``flashjax calibrate``), its relufied version (``scripts/relufy.py``) and
any other converted models, on the same held-out text.

    python scripts/sparsity_curve.py --swiglu data/llama-swiglu-fj --relu data/llama-relu-fj \\
        --other "OPT (shipped)=$(python -c 'import flashjax.shipped as s; print(s.converted_dir())')" \\
        --calib-text data/corpus/train.txt --text data/corpus/heldout.txt \\
        --out docs/bench/sparsity

Each row: the dense (thresholded, for calibrated rows) model's teacher-forced perplexity over
``--tokens`` held-out tokens in ``--seq-len`` windows, and per token the fraction of each
layer's FFN neurons that fire, which is the fraction of FFN rows the oracle reads (the
flash path computes exactly this model: tests/test_swiglu.py). Calibrated copies are made in
a temporary directory; the stores given are not changed. Writes ``sparsity.json``,
``sparsity.md`` and ``sparsity.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import flashjax
from flashjax.predictor.calibrate import calibrate
from flashjax.predictor.collect import ffn_activations
from flashjax.predictor.evaluate import _nll
from flashjax.predictor.text import sequences


def measure(model_dir: Path, text: Path, tokens: int, seq_len: int) -> dict:
    model = flashjax.load(model_dir, progress=False)
    cfg = model.cfg
    seqs = list(sequences(text, model.tokenizer, seq_len=min(seq_len, cfg.max_sequence),
                          bos_id=cfg.bos_token_id, eos_id=cfg.eos_token_id, max_tokens=tokens))
    nll, active = [], []
    for seq in tqdm(seqs, desc=model_dir.name, unit="seq", leave=False):
        _, bits, logits = ffn_activations(cfg, model.params, jnp.asarray(seq[None]))
        nll.append(_nll(np.asarray(logits[0]), seq))
        on = np.unpackbits(np.asarray(bits), axis=-1, count=cfg.ffn_dim, bitorder="little")
        active.append(on.reshape(cfg.num_hidden_layers, -1, cfg.ffn_dim).mean(axis=(1, 2)))
    per_layer = np.mean(active, axis=0)
    return {"perplexity": round(float(np.exp(np.concatenate(nll).mean())), 3),
            "rows_per_token": round(float(per_layer.mean()), 4),
            "rows_per_token_per_layer": [round(float(a), 4) for a in per_layer],
            "tokens": int(sum(len(s) - 1 for s in seqs)), "activation": cfg.activation,
            "parameters": int(sum(np.prod(x.shape) for x in
                                  __import__("jax").tree.leaves(model.params)))}


def table(rows: list[dict]) -> str:
    lines = ["| model | setting | FFN rows read per token | perplexity | vs dense |",
             "|---|---|---|---|---|"]
    for r in rows:
        vs = "" if r.get("vs_dense") is None else f"{100 * r['vs_dense']:+.1f}%"
        lines.append(f"| {r['model']} | {r['setting']} | {100 * r['rows_per_token']:.1f}% | "
                     f"{r['perplexity']:.2f} | {vs} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    calibrated = [r for r in rows if r["kind"] == "calibrated"]
    ax.plot([100 * r["rows_per_token"] for r in calibrated],
            [r["perplexity"] for r in calibrated], marker="o",
            label=f"{calibrated[0]['model']}, calibrated")
    for r in calibrated:
        ax.annotate(r["setting"], (100 * r["rows_per_token"], r["perplexity"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    for r, marker in zip([r for r in rows if r["kind"] != "calibrated"], "s^Dv"):
        ax.scatter([100 * r["rows_per_token"]], [r["perplexity"]], marker=marker, s=60,
                   label=f"{r['model']} ({r['setting']})", zorder=3)
    ax.set_xlabel("FFN rows read per token (% of neurons that fire)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("perplexity against the FFN rows a token needs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--swiglu", type=Path, required=True, help="a converted SwiGLU store")
    p.add_argument("--relu", type=Path, default=None, help="its relufied version, converted")
    p.add_argument("--other", action="append", default=[], metavar="NAME=STORE",
                   help="another converted model to place on the same axes")
    p.add_argument("--calib-text", type=Path, required=True)
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--text", type=Path, required=True, help="held-out text")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--sparsities", default="0,0.25,0.4,0.5,0.65")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows = []
    name = "SwiGLU Llama"
    with tempfile.TemporaryDirectory(prefix="sparsity-") as tmp:
        dense = measure(args.swiglu, args.text, args.tokens, args.seq_len)
        rows.append({"model": name, "setting": "dense", "kind": "dense", **dense})
        for s in (float(x) for x in args.sparsities.split(",")):
            copy = Path(tmp) / f"s{s}"
            shutil.copytree(args.swiglu, copy, ignore=shutil.ignore_patterns("predictors"))
            record = calibrate(copy, args.calib_text, sparsity=s, tokens=args.calib_tokens,
                               seq_len=args.seq_len, progress=False)
            m = measure(copy, args.text, args.tokens, args.seq_len)
            rows.append({"model": name, "setting": f"{100 * s:.0f}% calibrated",
                         "kind": "calibrated", "calibration_measured": record["measured_mean"],
                         **m})
            shutil.rmtree(copy)
    if args.relu is not None:
        rows.append({"model": "relufied Llama", "setting": "ReLU, its own sparsity",
                     "kind": "relu", **measure(args.relu, args.text, args.tokens, args.seq_len)})
    for spec in args.other:
        label, _, store = spec.partition("=")
        rows.append({"model": label, "setting": "its own sparsity", "kind": "other",
                     **measure(Path(store), args.text, args.tokens, args.seq_len)})
    for r in rows:
        r["vs_dense"] = (round(r["perplexity"] / dense["perplexity"] - 1, 4)
                         if r["model"] in (name, "relufied Llama") else None)
    result = {"command": " ".join([sys.executable, *sys.argv]), "rows": rows,
              "seconds": round(time.time() - started, 1)}
    (args.out / "sparsity.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "sparsity.md").write_text(table(rows) + "\n")
    plot(rows, args.out / "sparsity.png")
    print(table(rows))


if __name__ == "__main__":
    main()
