"""``flashjax bench``: the paper's configurations side by side, under one DRAM budget.

Every configuration runs the same greedy generation from the same prompt with O_DIRECT reads
(the page cache never serves the store), so each reports storage bytes next to flash bytes.
Per generated token: I/O, memory management, predictor and compute milliseconds (medians),
flash bytes and achieved read throughput; the storage device's own random-read limit at the
bundle size is measured in the same run for comparison.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np

import flashjax
from flashjax.store import bundles
from flashjax.store.manifest import Manifest

PHASES = ("io", "memory", "predictor", "compute")
PROMPT_TEXT = "The Python interpreter reads a line of input and"


def configurations(has_predictors: bool, window: int) -> dict[str, dict]:
    """Name -> ``flashjax.load`` options, in the order of the paper's ablation."""
    chosen = "lowrank" if has_predictors else "oracle"
    configs = {
        "naive": {"predictor": None},
        "hybrid": {"predictor": None, "hybrid": True},
        "predictor": {"predictor": chosen, "window": 1},
        "predictor+window unbundled": {"predictor": chosen, "window": window,
                                       "bundled": False},
        "predictor+window": {"predictor": chosen, "window": window},
        "oracle+window": {"predictor": "oracle", "window": window},
    }
    if not has_predictors:  # without trained predictors "predictor" is the oracle itself
        del configs["oracle+window"]
    return configs


def _prompt(model) -> list[int]:
    if model.tokenizer is not None:
        return model.encode(PROMPT_TEXT)
    return [model.cfg.bos_token_id, *range(10, 10 + 9)]


def run_config(model_dir, budget, options: dict, tokens: int) -> dict:
    model = flashjax.load(model_dir, dram_budget=budget, **options)
    prompt = _prompt(model)
    model.generate(prompt, 2, stop_at_eos=False)  # compile everything first
    ids, stats = model.generate(prompt, tokens, stop_at_eos=False, return_stats=True)
    decode = slice(len(prompt), None)  # per-token figures over generated tokens only
    per = {p: np.array(stats["per_token"][f"{p}_s"][decode]) for p in PHASES}
    total = sum(per.values())
    rows = np.array(stats["rows_loaded_per_token"][decode])
    row_bytes = model.reader.row_bytes
    io_s = per["io"].sum()
    result = {
        "options": options,
        "ms_per_token": float(np.median(total) * 1e3),
        **{f"{p}_ms": float(np.median(per[p]) * 1e3) for p in PHASES},
        "flash_bytes_per_token": float(rows.mean() * row_bytes),
        "read_gbps": float(rows.sum() * row_bytes / io_s / 1e9) if io_s > 0 else 0.0,
        "rows_loaded_per_token": float(rows.mean()),
        "rows_needed_per_token": stats["rows_needed"] / max(stats["tokens"], 1),
        "rows_dropped": stats["rows_dropped"],
        "flash_bytes_read": stats["flash_bytes_read"],
        "storage_bytes_read": stats["storage_bytes_read"],
        "peak_dram_bytes": stats["peak_dram_bytes"],
        "capacity": stats["capacity"],
        "tokens": len(ids),
    }
    del model
    gc.collect()
    return result


def bench(model_dir, *, dram_budget="50%", tokens: int = 16, window: int = 4,
          windows=(1, 2, 4, 8), device: bool = True, device_seconds: float = 0.5,
          progress: bool = True) -> dict:
    model_dir = Path(model_dir)
    manifest = Manifest.read(model_dir)
    has_predictors = (model_dir / "predictors").exists()
    bundles.write_split(model_dir)  # the unbundled copy bundling is compared with
    result = {"model": str(model_dir), "dram_budget": dram_budget, "tokens": tokens,
              "row_bytes": manifest.row_bytes, "configs": {}}
    for name, options in configurations(has_predictors, window).items():
        if progress:
            print(f"bench: {name} ...", flush=True)
        result["configs"][name] = run_config(model_dir, dram_budget, options, tokens)
    naive = result["configs"]["naive"]["ms_per_token"]
    for r in result["configs"].values():
        r["speedup_vs_naive"] = naive / r["ms_per_token"]
    chosen = "lowrank" if has_predictors else "oracle"
    result["window_sweep"] = {
        k: run_config(model_dir, dram_budget, {"predictor": chosen, "window": k}, tokens)[
            "rows_loaded_per_token"] for k in windows}
    if device:
        from flashjax.bench.device import device_limit, throughput_at

        limit = device_limit(model_dir.parent, chunk_sizes=(4096, 8192, 16384, 32768, 65536),
                             concurrencies=(1, 4, 16, 32), seconds=device_seconds,
                             file_bytes=1 << 30, progress=progress)
        row = max(manifest.row_bytes, 4096)
        limit["read_gbps_at_bundle_size"] = throughput_at(limit, row, 32)
        result["device_limit"] = limit
    return result


def format_table(result: dict) -> str:
    """The paper's latency table: one row per configuration."""
    head = (f"{'configuration':<27}{'I/O':>8}{'memory':>8}{'predict':>8}{'compute':>9}"
            f"{'total':>9}{'flash MB':>10}{'GB/s':>7}{'speedup':>9}")
    lines = [f"ms per generated token (median), DRAM budget {result['dram_budget']}", head]
    for name, r in result["configs"].items():
        lines.append(f"{name:<27}{r['io_ms']:>8.1f}{r['memory_ms']:>8.1f}"
                     f"{r['predictor_ms']:>8.1f}{r['compute_ms']:>9.1f}{r['ms_per_token']:>9.1f}"
                     f"{r['flash_bytes_per_token'] / 1e6:>10.3f}{r['read_gbps']:>7.2f}"
                     f"{r['speedup_vs_naive']:>8.1f}x")
    lines.append("storage bytes / flash bytes per configuration: " + ", ".join(
        f"{n} {r['storage_bytes_read'] / max(r['flash_bytes_read'], 1):.2f}"
        for n, r in result["configs"].items() if r["storage_bytes_read"] is not None))
    if "device_limit" in result:
        lines.append(f"device limit at the bundle size ({result['row_bytes']} B, 32 threads): "
                     f"{result['device_limit']['read_gbps_at_bundle_size']:.2f} GB/s")
    return "\n".join(lines)


def plot(result: dict, out_dir) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    names = list(result["configs"])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bottom = np.zeros(len(names))
    for phase in PHASES:
        values = np.array([result["configs"][n][f"{phase}_ms"] for n in names])
        ax.bar(names, values, bottom=bottom, label=phase)
        bottom += values
    ax.set(ylabel="ms per token (medians)", title=f"latency breakdown, DRAM budget "
           f"{result['dram_budget']}")
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "latency_breakdown.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ks = sorted(result["window_sweep"], key=int)
    ax.plot([int(k) for k in ks], [result["window_sweep"][k] for k in ks], marker="o")
    ax.set(xlabel="window k (tokens)", ylabel="rows loaded per token (all layers)",
           title="rows loaded from flash vs window")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out_dir / "window_rows.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    if "device_limit" in result:
        from flashjax.bench.device import plot_device_limit

        paths.append(plot_device_limit(result["device_limit"], out_dir / "device_limit.png",
                                       mark_chunk=result["row_bytes"]))
    return paths


def save_json(result: dict, path) -> None:
    Path(path).write_text(json.dumps(result, indent=1, default=str))
