"""Perplexity and flash bytes per token of a model's float16, int8 and int4 flash stores.

    python scripts/quant_quality.py [--model DIR] --heldout data/corpus/heldout.txt \\
        --train data/corpus/train.txt [--tokens 4096] [--out docs/bench/quant]

From a converted float store (default: the shipped OPT model), writes int8 and int4 stores
rounded to nearest, and an int4 store whose scales are fitted to the FFN inputs on --train
text (``--method mse``, activations from ``flashjax collect``); then runs ``flashjax eval`` on
each (held-out text, the trained predictors, 50% budget, window 4): the dense perplexity of
the store's own (dequantized) weights, the flash perplexity with predictors, and the flash
bytes read per token. Writes quality.json, quality.md and quality.png to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import flashjax
from flashjax.predictor.collect import collect
from flashjax.predictor.evaluate import evaluate
from flashjax.store.manifest import Manifest

VARIANTS = {  # name -> (ffn dtype, method)
    "int8": ("int8", "rtn"),
    "int4": ("int4", "rtn"),
    "int4 mse": ("int4", "mse"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a converted float16 model dir (default: the shipped model)")
    p.add_argument("--heldout", required=True)
    p.add_argument("--train", required=True, help="text for the mse method's activations")
    p.add_argument("--tokens", type=int, default=4096, help="held-out tokens per evaluation")
    p.add_argument("--calibration-tokens", type=int, default=16384)
    p.add_argument("--dram-budget", default="50%")
    p.add_argument("--work", default="data/quant-work")
    p.add_argument("--out", default="docs/bench/quant")
    args = p.parse_args()
    if args.model is None:
        from flashjax.shipped import default_model_dir

        args.model = str(default_model_dir(progress=True))
    base, work, out = Path(args.model), Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    acts = work / "activations"
    if any(m == "mse" for _, m in VARIANTS.values()):
        collect(flashjax.load(base, progress=False), args.train, acts,
                tokens=args.calibration_tokens, seq_len=256, batch=8)
    stores = {"float16": base}
    for name, (ffn_dtype, method) in VARIANTS.items():
        path = work / name.replace(" ", "-")
        if not path.exists():
            flashjax.quantize(base, path, ffn_dtype, method=method,
                              data=acts if method == "mse" else None)
        stores[name] = path
    rows = {}
    for name, path in stores.items():
        t0 = time.perf_counter()
        r = evaluate(path, args.heldout, dram_budget=args.dram_budget, tokens=args.tokens)
        m = Manifest.read(path)
        rows[name] = {"store": str(path), "row_bytes": m.row_bytes, "ffn_bytes": m.ffn_bytes,
                      "quant": None if m.quant is None else m.quant.to_json(),
                      "eval_seconds": time.perf_counter() - t0,
                      **{k: r[k] for k in ("tokens", "ppl_dense", "ppl_sparse", "ppl_ratio",
                                           "recall", "precision", "flash_bytes_per_token",
                                           "storage_bytes_per_token", "rows_streamed",
                                           "dram_budget_bytes", "capacity", "window")}}
        print(f"{name}: dense {r['ppl_dense']:.3f}, flash {r['ppl_sparse']:.3f}, "
              f"{r['flash_bytes_per_token'] / 1e3:.1f} kB/token", flush=True)
    ref = rows["float16"]["ppl_dense"]
    for r in rows.values():
        r["flash_vs_float16_dense"] = r["ppl_sparse"] / ref - 1
    command = ("python scripts/quant_quality.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if v is not None and k != "model"))
    result = {"command": command, "model": str(base), "heldout": args.heldout, "rows": rows}
    (out / "quality.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["| store | row bytes | FFN on flash | dense ppl (own weights) | flash ppl, predictors "
             "| vs float16 dense | flash bytes/token | storage bytes/token |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['row_bytes']} | {r['ffn_bytes'] / 1e6:.1f} MB | "
                     f"{r['ppl_dense']:.2f} | {r['ppl_sparse']:.2f} | "
                     f"{100 * r['flash_vs_float16_dense']:+.2f}% | "
                     f"{r['flash_bytes_per_token'] / 1e3:.1f} kB | "
                     f"{r['storage_bytes_per_token'] / 1e3:.1f} kB |")
    (out / "quality.md").write_text("\n".join(lines) + f"\n\n`{command}`\n")
    print("\n".join(lines))
    plot(rows, out / "quality.png")


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in rows.items():
        x = r["flash_bytes_per_token"] / 1e3
        ax.scatter([x], [r["ppl_sparse"]], s=40)
        ax.annotate(name, (x, r["ppl_sparse"]), textcoords="offset points", xytext=(5, 5))
    ax.axhline(rows["float16"]["ppl_dense"], color="grey", ls="--", lw=1,
               label="float16 dense")
    ax.set_xlabel("flash bytes read per token (kB)")
    ax.set_ylabel("held-out perplexity, flash with predictors")
    ax.set_title("Quantized flash stores")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
