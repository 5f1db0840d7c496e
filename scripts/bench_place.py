"""A store before and after ``flashjax place``, in one bench session: storage requests per
token, mean request size, bytes, I/O ms and ms per token, with and without gap reads; and the
run-length distribution of a window's new rows before and after (plot).

    python scripts/bench_place.py BEFORE AFTER (--data ACTS_DIR | --trace TRACE.npz)
        [--predictor lowrank] [--dram-budget 50%] [--tokens 24] [--rounds 3]
        [--out docs/bench/place]

Each round runs every configuration in turn (original and placed store, gap reads off and at
the reader's default), so drift in the storage's rate falls on all alike; ratios to the
original store with the default gap are taken per round, then their median. With ``--trace``
the needed rows come from the trace (synthetic stores) and ``--predictor`` is ignored. Reads are
O_DIRECT; ``storage_bytes_per_token`` is the kernel's count (/proc/self/io). The run lengths
come from the held-out part of the activity (the last quarter), window 4.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from flashjax.bench.run import _budget_bytes, run_config
from flashjax.store import place
from flashjax.store.manifest import Manifest
from flashjax.store.reader import GAP_CROSSOVER as GAP

KEEP = ("ms_per_token", "io_ms", "compute_ms", "memory_ms", "predictor_ms", "requests_per_token",
        "mean_request_bytes", "flash_bytes_per_token", "storage_bytes_per_token",
        "rows_read_per_token", "storage_gbps")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before")
    p.add_argument("after")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data")
    src.add_argument("--trace")
    p.add_argument("--predictor", default="lowrank")
    p.add_argument("--dram-budget", default="50%")
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--out", default="docs/bench/place")
    args = p.parse_args()
    before, after = Path(args.before), Path(args.after)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = _budget_bytes(before, Manifest.read(before), args.dram_budget)
    base = ({"predictor": "trace", "trace": str(args.trace)} if args.trace
            else {"predictor": args.predictor})
    configs = {f"{name}, gap {gap // 1024} KiB": (store, {**base, "window": args.window,
                                                          "read_gap": gap})
               for name, store in (("original", before), ("placed", after))
               for gap in (0, GAP)}
    first = f"original, gap {GAP // 1024} KiB"
    runs = {n: [] for n in configs}
    ids = {}
    for round_ in range(args.rounds):
        for name, (store, options) in configs.items():
            r = run_config(store, budget, options, args.tokens, prompt_tokens=8)
            runs[name].append({k: r.get(k) for k in KEEP})
            ids.setdefault(name, r["ids"])
            print(f"round {round_ + 1} {name}: {r['ms_per_token']:.1f} ms/token, io "
                  f"{r['io_ms']:.2f} ms, {r['requests_per_token']:.1f} requests of "
                  f"{r['mean_request_bytes'] / 1024:.1f} KiB", flush=True)
    same_tokens = len({tuple(v) for v in ids.values()}) == 1
    rows = {}
    for name in configs:
        med = {k: float(np.median([r[k] for r in runs[name]])) for k in KEEP
               if all(isinstance(r[k], (int, float)) for r in runs[name])}
        ratios = {}
        for key in ("ms_per_token", "io_ms", "requests_per_token"):
            rs = [a[key] / b[key] for a, b in zip(runs[name], runs[first]) if b[key]]
            ratios[key] = [float(np.median(rs)), float(min(rs)), float(max(rs))]
        rows[name] = {"store": str(configs[name][0]), "options": configs[name][1],
                      "median": med, "vs_original": ratios, "runs": runs[name]}
    lengths = _run_lengths(before, after, args)
    command = "python scripts/bench_place.py " + " ".join(
        [args.before, args.after] + [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                     if k not in ("before", "after") and v is not None])
    result = {"command": command, "budget_bytes": budget, "same_tokens": same_tokens,
              "rows": rows, "run_lengths": {k: _summary(v) for k, v in lengths.items()}}
    (out / "place.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"Budget {budget / 1e6:.1f} MB ({args.dram_budget}), {base['predictor']}, window "
             f"{args.window}, median of {args.rounds} rounds x {args.tokens} tokens; the same "
             f"tokens in every configuration: {same_tokens}.", "",
             "| configuration | requests/token | mean request KiB | storage kB/token | "
             "rows/token | I/O ms | ms/token | requests vs original | I/O vs original | "
             "ms/token vs original |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        md, v = r["median"], r["vs_original"]
        lines.append(
            f"| {name} | {md['requests_per_token']:.1f} | {md['mean_request_bytes'] / 1024:.1f}"
            f" | {md.get('storage_bytes_per_token', float('nan')) / 1e3:.0f} | "
            f"{md['rows_read_per_token']:.0f} | {md['io_ms']:.2f} | {md['ms_per_token']:.1f} | "
            + " | ".join(f"{v[k][0]:.2f}x ({v[k][1]:.2f}-{v[k][2]:.2f})"
                         for k in ("requests_per_token", "io_ms", "ms_per_token")) + " |")
    lines += ["", "Runs of adjacent rows among a window's new rows (held-out activity): "
              + "; ".join(f"{k}: mean {s['mean']:.2f}, {s['single'] * 100:.0f}% single rows, "
                          f"p90 {s['p90']:.0f}" for k, s in result["run_lengths"].items())]
    (out / "place.md").write_text("\n".join(lines) + f"\n\n`{command}`\n")
    print("\n".join(lines))
    _plot(lengths, out / "run_lengths.png")


def _summary(v: np.ndarray) -> dict:
    return {"runs": int(v.size), "mean": float(v.mean()), "single": float((v == 1).mean()),
            "p90": float(np.percentile(v, 90)), "max": int(v.max())}


def _run_lengths(before: Path, after: Path, args) -> dict[str, np.ndarray]:
    """Run lengths of every layer's new rows on the held-out quarter, in both orders."""
    manifest = Manifest.read(before)
    activity = place._Activity(before, manifest, args.data, args.trace)
    order = place.load_order(after, Manifest.read(after))
    current = activity.current
    out = {"original": [], "placed": []}
    for layer in range(activity.n_layers):
        held = activity.layer(layer)[int(activity.tokens * 0.75):][:place.SCORE_TOKENS]
        # the placed store's rows as a permutation of the original store's rows
        base = np.arange(activity.n) if current is None else current[layer]
        pos = np.empty(activity.n, np.int64)
        pos[base] = np.arange(activity.n)
        out["original"].append(place.run_lengths(held, np.arange(activity.n), args.window))
        out["placed"].append(place.run_lengths(held, pos[order[layer]], args.window))
    return {k: np.concatenate(v) for k, v in out.items()}


def _plot(lengths: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    top = int(max(np.percentile(v, 99.5) for v in lengths.values())) + 1
    bins = np.arange(1, top + 2) - 0.5
    for name, v in lengths.items():
        # share of the rows that sit in runs of each length
        ax.hist(np.minimum(v, top), bins=bins, weights=v / v.sum(), histtype="step", lw=2,
                label=f"{name} (mean run {v.mean():.2f})")
    ax.set_xlabel("run length (adjacent rows read together)")
    ax.set_ylabel("share of rows read")
    ax.set_title("runs among a window's new rows, before and after placement")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
