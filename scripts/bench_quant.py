"""float16, int8 and int4 stores of one model in one bench session: ms per token, I/O ms and
the reads' fraction of the device's rate at their row size.

    python scripts/bench_quant.py STORE [STORE ...] --trace TRACE.npz [--dram-budget 50%]
        [--tokens 6] [--rounds 2] [--naive-tokens 2] [--out docs/bench/quant-opt-6.7b]

The stores are ``flashjax quantize`` outputs of the first (a float16 store), all given the
same DRAM budget in bytes (a fraction refers to the float model, whichever store). Each round
runs predictor+window (the trace's row sets, window 4) on every store in turn, so drift in the
storage's rate falls on all of them alike (ratios to the first store are taken per round, then
their median); right after each run the device's rate for batches
of that run's own size (row bytes rounded to blocks, its median rows per read, its reader
threads) is measured on the store's shard files, and once per session the random-read sweep
(4 KiB..1 MiB x 1..64 in flight). Naive streaming (every row, every token) runs once per store.
Reads are O_DIRECT; ``storage_bytes_per_token`` is the kernel's count (/proc/self/io). Writes
quant.json, quant.md and quant.png to --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from flashjax.bench.device import device_limit
from flashjax.bench.run import (_budget_bytes, _whole_blocks, compare_with_device,
                                compare_with_same_batches, run_config)
from flashjax.store import bundles
from flashjax.store.manifest import Manifest

KEEP = ("ms_per_token", "io_ms", "compute_ms", "memory_ms", "predictor_ms", "wall_ms_per_token",
        "flash_bytes_per_token", "storage_bytes_per_token", "read_gbps", "storage_gbps",
        "rows_read_per_token", "rows_per_read_median", "reader_threads", "capacity",
        "resident_dtype", "peak_dram_bytes", "rows_dropped", "device_gbps_same_pattern",
        "device_chunk_bytes", "device_fraction", "device_fraction_same_batches")


def _name(m: Manifest) -> str:
    q = m.quant
    return m.ffn_dtype if q is None else f"{q.name} ({q.scales} scales)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stores", nargs="+")
    p.add_argument("--trace", required=True)
    p.add_argument("--dram-budget", default="50%")
    p.add_argument("--tokens", type=int, default=6)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--naive-tokens", type=int, default=2)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--device-seconds", type=float, default=0.5)
    p.add_argument("--out", default="docs/bench/quant-opt-6.7b")
    args = p.parse_args()
    stores = [Path(s) for s in args.stores]
    manifests = [Manifest.read(s) for s in stores]
    names = [_name(m) for m in manifests]
    budget = _budget_bytes(stores[0], manifests[0], args.dram_budget)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # the device's random-read sweep over the first store's shard files, at every row size
    shards = sorted((stores[0] / bundles.FFN_DIR).glob("layer_*/c/0/0"))
    chunks = sorted({4096, 8192, 16384, 32768, 65536, 1 << 20}
                    | {_whole_blocks(m.row_bytes) for m in manifests})
    limit = device_limit(shards, chunk_sizes=chunks, concurrencies=(1, 4, 8, 16, 32, 64),
                         seconds=args.device_seconds, progress=True)
    limit["read_gbps_best"] = max(pt["gb_s"] for pt in limit["points"])

    options = {"predictor": "trace", "trace": str(args.trace), "window": args.window}
    runs = {n: [] for n in names}
    for round_ in range(args.rounds):
        for store, m, name in zip(stores, manifests, names):
            r = run_config(store, budget, options, args.tokens, prompt_tokens=2)
            compare_with_same_batches(r, store, m.row_bytes, args.device_seconds)
            compare_with_device(r, limit, m.row_bytes)
            runs[name].append({k: r.get(k) for k in KEEP} | {"ids": r["ids"]})
            print(f"round {round_ + 1} {name}: {r['ms_per_token']:.1f} ms/token, io "
                  f"{r['io_ms']:.1f} ms, {r['flash_bytes_per_token'] / 1e6:.2f} MB/token",
                  flush=True)
    naive = {}
    for store, m, name in zip(stores, manifests, names):
        r = run_config(store, budget, {"predictor": None}, args.naive_tokens, prompt_tokens=2)
        compare_with_device(r, limit, m.row_bytes)
        naive[name] = {k: r.get(k) for k in KEEP}
        print(f"naive {name}: {r['ms_per_token']:.1f} ms/token", flush=True)

    rows = {}
    for store, m, name in zip(stores, manifests, names):
        med = {k: float(np.median([r[k] for r in runs[name] if r[k] is not None]))
               for k in KEEP if isinstance(runs[name][0][k], (int, float))}
        rows[name] = {"store": str(store), "row_bytes": m.row_bytes,
                      "resident_scale_bytes": m.scale_bytes, "ffn_bytes": m.ffn_bytes,
                      "median": med, "runs": runs[name], "naive": naive[name]}
    # per round against the first store's run of the same round (the storage's rate drifts
    # between rounds; within one they run back to back), then the median of those ratios
    first = runs[names[0]]
    for name, r in rows.items():
        for key, out_key in (("ms_per_token", "ms_vs_first"), ("io_ms", "io_vs_first")):
            ratios = [a[key] / b[key] for a, b in zip(runs[name], first) if b[key]]
            r[out_key] = float(np.median(ratios)) if ratios else None
            r[out_key + "_range"] = [float(min(ratios)), float(max(ratios))] if ratios else None
    command = "python scripts/bench_quant.py " + " ".join(args.stores) + " " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "stores")
    result = {"command": command, "budget_bytes": budget, "dram_budget": args.dram_budget,
              "device_limit": limit, "rows": rows}
    (out / "quant.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"Budget {budget / 1e9:.2f} GB ({args.dram_budget} of the float model), "
             f"predictor+window (trace, window {args.window}), median of {args.rounds} rounds "
             f"x {args.tokens} tokens; naive: {args.naive_tokens} tokens.", "",
             "| store | row B | ms/token | I/O ms | ms/token vs first (range) | I/O vs first "
             "(range) | MB/token (rows) | MB/token (storage) | GB/s | device GB/s same pattern | "
             "fraction | same batches | naive ms/token |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        md = r["median"]
        lines.append(
            f"| {name} | {r['row_bytes']} | {md['ms_per_token']:.1f} | {md['io_ms']:.1f} | "
            f"{_ratio(r, 'ms_vs_first')} | {_ratio(r, 'io_vs_first')} | "
            f"{md['flash_bytes_per_token'] / 1e6:.2f} | "
            f"{md.get('storage_bytes_per_token', 0) / 1e6:.2f} | {md['storage_gbps']:.2f} | "
            f"{md['device_gbps_same_pattern']:.2f} | {md['device_fraction']:.2f} | "
            f"{md.get('device_fraction_same_batches', float('nan')):.2f} | "
            f"{r['naive']['ms_per_token']:.0f} |")
    (out / "quant.md").write_text("\n".join(lines) + f"\n\n`{command}`\n")
    print("\n".join(lines))
    plot(rows, out / "quant.png")


def _ratio(r: dict, key: str) -> str:
    if r[key] is None:
        return "-"
    low, high = r[key + "_range"]
    return f"{r[key]:.2f}x ({low:.2f}-{high:.2f})"


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    phases = ("io_ms", "compute_ms", "memory_ms", "predictor_ms")
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = np.zeros(len(names))
    for phase in phases:
        values = np.array([rows[n]["median"].get(phase, 0.0) for n in names])
        ax.bar(names, values, bottom=bottom, label=phase[:-3])
        bottom += values
    ax.set_ylabel("ms per token (median token)")
    ax.set_title("predictor+window by FFN row dtype")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
