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
import textwrap
from pathlib import Path

import numpy as np

import flashjax
from flashjax.store import bundles
from flashjax.store.manifest import Manifest

PHASES = ("io", "memory", "predictor", "compute")
PROMPT_TEXT = "The Python interpreter reads a line of input and"


def chosen_predictor(has_predictors: bool, trace: str | None = None) -> dict:
    """The needed-set source of the predictor configurations: an activity trace when given
    (synthetic stores), else the trained predictors, else the oracle."""
    if trace is not None:
        return {"predictor": "trace", "trace": str(trace)}
    return {"predictor": "lowrank" if has_predictors else "oracle"}


def configurations(has_predictors: bool, window: int, trace: str | None = None
                   ) -> dict[str, dict]:
    """Name -> ``flashjax.load`` options, in the order of the paper's ablation."""
    chosen = chosen_predictor(has_predictors, trace)
    configs = {
        "naive": {"predictor": None},
        "hybrid": {"predictor": "hybrid"},
        "predictor": {**chosen, "window": 1},
        "predictor+window unbundled": {**chosen, "window": window, "bundled": False},
        # every piece waited for and timed on its own: what overlapping reads with device
        # work (the default, in every configuration here) saves
        "predictor+window, no overlap": {**chosen, "window": window, "overlap": False},
        "predictor+window": {**chosen, "window": window},
        "oracle+window": {"predictor": "oracle", "window": window},
    }
    # without trained predictors "predictor" is the oracle itself; with a trace the store's
    # weights are random, so the oracle's sets would be a random model's, not a bound
    if not has_predictors or trace is not None:
        del configs["oracle+window"]
    return configs


def _streaming(options: dict) -> bool:
    """The baselines that read every row (long contiguous runs), not row sets."""
    return options.get("predictor") in (None, "naive", "hybrid")


def load_options(model_dir, options: dict) -> dict:
    """``flashjax.load`` keywords for a configuration's (JSON-friendly) options: a trace
    file becomes the trace selector."""
    if options.get("predictor") != "trace":
        return options
    from flashjax.bench.activity import TraceSelector

    rest = {k: v for k, v in options.items() if k not in ("predictor", "trace")}
    return {"predictor": TraceSelector.open(options["trace"], model_dir), **rest}


def _prompt(model, prompt_tokens: int | None) -> list[int]:
    if model.tokenizer is not None and prompt_tokens is None:
        return model.encode(PROMPT_TEXT)
    return [model.cfg.bos_token_id, *range(10, 10 + (prompt_tokens or 10) - 1)]


def _device_gbps_at(limit: dict, chunk: int, concurrency: float) -> float:
    """The device's GB/s at ``chunk`` bytes and ``concurrency`` reads in flight, linear in
    log2 of both between measured points (clamped to the measured range)."""
    from flashjax.bench.device import throughput_at

    chunks = sorted({p["chunk_bytes"] for p in limit["points"]})
    chunk = min(max(chunk, chunks[0]), chunks[-1])
    concs = sorted({p["concurrency"] for p in limit["points"]})
    concurrency = min(max(concurrency, concs[0]), concs[-1])
    values = [throughput_at(limit, chunk, c) for c in concs]
    return float(np.interp(np.log2(concurrency), np.log2(concs), values))


def _whole_blocks(nbytes: int, block: int = 4096) -> int:
    """What an O_DIRECT read of ``nbytes`` costs the device: whole blocks, at least one."""
    return max(block, -(-nbytes // block) * block)


def bundling_gain(limit: dict, row_bytes: int, concurrency: int = 32, parts: int = 2) -> float:
    """Neurons per second read as one bundle each, against one read per part (OPT: two
    halves; gated FFNs: three thirds), at the device's rates for the two read sizes in sweep
    ``limit``."""
    part, whole = _whole_blocks(row_bytes // parts), _whole_blocks(row_bytes)
    return (parts * _device_gbps_at(limit, whole, concurrency) * part
            / (_device_gbps_at(limit, part, concurrency) * whole))


def compare_with_device(r: dict, limit: dict, row_bytes: int, parts: int = 2) -> None:
    """Add to config record ``r`` the device's throughput for the same read pattern and the
    fraction of it that ``r`` achieved. The streaming baselines read long contiguous runs:
    compared with the best the device does. The others read rows, at most reader_threads at a
    time: compared at the row size (unbundled: one part of a bundle per read, at least one
    block)."""
    streaming = _streaming(r["options"])
    chunk = _whole_blocks(row_bytes if r["options"].get("bundled", True) else row_bytes // parts)
    conc = max(1, min(r["reader_threads"], r["rows_per_read_median"]))
    device_gbps = limit["read_gbps_best"] if streaming else _device_gbps_at(limit, chunk, conc)
    r["device_chunk_bytes"] = None if streaming else chunk
    r["device_gbps_same_pattern"] = device_gbps
    r["device_fraction"] = _achieved_gbps(r) / device_gbps if device_gbps > 0 else None


def _achieved_gbps(r: dict) -> float:
    """What the device delivered to configuration ``r``: storage bytes per second of I/O where
    the kernel counts them (rows below a block cost a whole block), else the rows' bytes."""
    return r["storage_gbps"] if r["storage_gbps"] is not None else r["read_gbps"]


def compare_with_same_batches(r: dict, model_dir: Path, row_bytes: int,
                              seconds: float, parts: int = 2) -> None:
    """Add to row-set configuration ``r``, just after it ran, the device's rate for reads of
    its own size in batches of its own median size at its concurrency, over the files it read
    (``batch_rate``), and the fraction of that it achieved: the device's figure for the
    engine's own pattern, measured at the same time (the storage's rate drifts during a run)."""
    from flashjax.bench.device import batch_rate

    if _streaming(r["options"]) or not r["rows_per_read_median"]:
        return
    bundled = r["options"].get("bundled", True)
    files = sorted((model_dir / bundles.FFN_DIR).glob("layer_*/c/0/0")) if bundled else \
        sorted((model_dir / bundles.SPLIT_DIR).glob("*/c/0/0"))
    reads = round(r["rows_per_read_median"]) * (1 if bundled else parts)  # unbundled: a read
    # per part
    rate = batch_rate(files, chunk=_whole_blocks(row_bytes if bundled else row_bytes // parts),
                      batch=reads, concurrency=r["reader_threads"], seconds=seconds)
    r["device_same_batches"] = rate
    r["device_fraction_same_batches"] = (_achieved_gbps(r) / rate["gb_s"]
                                         if rate and rate["gb_s"] > 0 else None)


def run_config(model_dir, budget, options: dict, tokens: int,
               prompt_tokens: int | None = None) -> dict:
    model = flashjax.load(model_dir, dram_budget=budget, **load_options(model_dir, options))
    prompt = _prompt(model, prompt_tokens)
    model.generate(prompt[:2], 2, stop_at_eos=False)  # compile everything first
    ids, stats = model.generate(prompt, tokens, stop_at_eos=False, return_stats=True)
    decode = slice(len(prompt), None)  # per-token figures over generated tokens only
    per = {p: np.array(stats["per_token"][f"{p}_s"][decode]) for p in PHASES}
    total = sum(per.values())
    rows = np.array(stats["rows_read_per_token"][decode])
    row_bytes = model.reader.row_bytes
    io_s = per["io"].sum()
    io_all = sum(stats["per_token"]["io_s"])
    reads = np.array(stats["rows_per_read"] or [0])
    result = {
        "options": options,
        "ms_per_token": float(np.median(total) * 1e3),
        **{f"{p}_ms": float(np.median(per[p]) * 1e3) for p in PHASES},
        "flash_bytes_per_token": float(rows.mean() * row_bytes),
        "read_gbps": float(rows.sum() * row_bytes / io_s / 1e9) if io_s > 0 else 0.0,
        # what the device delivered, rows below a 4 KiB block costing a whole block
        "storage_gbps": float(stats["storage_bytes_read"] / io_all / 1e9)
        if io_all > 0 and stats["storage_bytes_read"] is not None else None,
        "rows_per_read_median": float(np.median(reads)),
        "reader_threads": model.options.reader_threads,
        "rows_read_per_token": float(rows.mean()),
        "rows_streamed": stats["rows_streamed"],
        "rows_needed_per_token": stats["rows_needed"] / max(stats["tokens"], 1),
        "rows_dropped": stats["rows_dropped"],
        "flash_bytes_read": stats["flash_bytes_read"],
        "storage_bytes_read": stats["storage_bytes_read"],
        "peak_dram_bytes": stats["peak_dram_bytes"],
        "budget_bytes": stats["dram_budget_bytes"],
        "capacity": stats["capacity"],
        "tokens": len(ids),
    }
    del model
    gc.collect()
    return result


def bench(model_dir, *, dram_budget="50%", tokens: int = 16, window: int = 4,
          windows=(1, 2, 4, 8), device: bool = True, device_seconds: float = 0.5,
          trace: str | None = None, prompt_tokens: int | None = None,
          progress: bool = True) -> dict:
    """Run every configuration (and the window sweep) on ``model_dir`` under ``dram_budget``;
    with ``device`` also the storage's random-read limit, against which each configuration's
    read throughput is put at its own row size and concurrency (``device_fraction``)."""
    model_dir = Path(model_dir)
    manifest = Manifest.read(model_dir)
    parts = len(manifest.config.ffn_parts)  # reads per neuron unbundled
    has_predictors = (model_dir / "predictors").exists()
    bundles.write_split(model_dir)  # the unbundled copy bundling is compared with
    result = {"model": str(model_dir), "dram_budget": dram_budget, "tokens": tokens,
              "row_bytes": manifest.row_bytes, "row_parts": parts, "trace": trace,
              "configs": {}}
    configs = configurations(has_predictors, window, trace)
    for name, options in configs.items():
        if progress:
            print(f"bench: {name} ...", flush=True)
        r = result["configs"][name] = run_config(model_dir, dram_budget, options, tokens,
                                                 prompt_tokens)
        if device:
            compare_with_same_batches(r, model_dir, manifest.row_bytes, device_seconds, parts)
    naive = result["configs"]["naive"]["ms_per_token"]
    for r in result["configs"].values():
        r["speedup_vs_naive"] = naive / r["ms_per_token"]
    chosen = chosen_predictor(has_predictors, trace)
    sweep = {}
    for k in windows:  # reuse the configurations already run with these options
        done = next((result["configs"][n] for n, o in configs.items()
                     if o == {**chosen, "window": k}), None)
        sweep[str(k)] = (done or run_config(model_dir, dram_budget, {**chosen, "window": k},
                                            tokens, prompt_tokens))["rows_read_per_token"]
    result["window_sweep"] = sweep
    if device:
        from flashjax.bench.device import device_limit

        rows = {_whole_blocks(manifest.row_bytes), _whole_blocks(manifest.row_bytes // parts)}
        chunks = sorted({4096, 8192, 16384, 32768, 65536, 1 << 20} | rows)
        # the store's own shard files: the bytes the engine reads, where they lie on the
        # storage (a fresh scratch file can sit in a virtual disk's host cache while the store
        # does not, or the other way round)
        shards = sorted((model_dir / bundles.FFN_DIR).glob("layer_*/c/0/0"))
        largest = max(f.stat().st_size for f in shards)
        chunks = [c for c in chunks if c <= largest] or [4096]  # (a tiny store's files)
        limit = device_limit(shards, chunk_sizes=chunks, concurrencies=(1, 4, 8, 16, 32, 64),
                             seconds=device_seconds, progress=progress)
        row = max(manifest.row_bytes, 4096)
        limit["read_gbps_at_bundle_size"] = _device_gbps_at(limit, row, 32)
        limit["read_gbps_best"] = max(p["gb_s"] for p in limit["points"])
        limit["bundling_gain"] = bundling_gain(limit, manifest.row_bytes, parts=parts)
        result["device_limit"] = limit
        # The unbundled copy lies in other files, which the storage may serve at another rate
        # (a virtual disk's host cache favours what was read most): its reads are put against
        # the same sweep over its own files, at its read size.
        split_limit = None
        if any(not r["options"].get("bundled", True) for r in result["configs"].values()):
            split = sorted((model_dir / bundles.SPLIT_DIR).glob("*/c/0/0"))
            half = _whole_blocks(manifest.row_bytes // parts)  # (a third for gated FFNs)
            whole = _whole_blocks(manifest.row_bytes)
            split_limit = device_limit(split, chunk_sizes=sorted({half, whole}),
                                       concurrencies=(1, 4, 8, 16, 32, 64),
                                       seconds=device_seconds, progress=progress)
            split_limit["read_gbps_at_half_bundle_size"] = _device_gbps_at(split_limit, half, 32)
            split_limit["bundling_gain_same_files"] = bundling_gain(
                split_limit, manifest.row_bytes, parts=parts)
            result["device_limit_unbundled"] = split_limit
        for r in result["configs"].values():
            unbundled = not r["options"].get("bundled", True)
            compare_with_device(r, split_limit if unbundled else limit, manifest.row_bytes,
                                parts)
    return result


def _parts(result: dict) -> str:
    return {2: "two halves", 3: "three thirds"}.get(result.get("row_parts", 2), "its parts")


def format_table(result: dict) -> str:
    """The paper's latency table: one row per configuration."""
    head = (f"{'configuration':<30}{'I/O':>8}{'memory':>8}{'predict':>8}{'compute':>9}"
            f"{'total':>9}{'flash MB':>10}{'GB/s':>7}{'speedup':>9}")
    lines = [f"ms per generated token (median), DRAM budget {result['dram_budget']}", head]
    for name, r in result["configs"].items():
        lines.append(f"{name:<30}{r['io_ms']:>8.1f}{r['memory_ms']:>8.1f}"
                     f"{r['predictor_ms']:>8.1f}{r['compute_ms']:>9.1f}{r['ms_per_token']:>9.1f}"
                     f"{r['flash_bytes_per_token'] / 1e6:>10.3f}{r['read_gbps']:>7.2f}"
                     f"{r['speedup_vs_naive']:>8.1f}x")
    lines.append("storage bytes / flash bytes per configuration: " + ", ".join(
        f"{n} {r['storage_bytes_read'] / max(r['flash_bytes_read'], 1):.2f}"
        for n, r in result["configs"].items() if r["storage_bytes_read"] is not None))
    if "device_limit" in result:
        limit = result["device_limit"]
        lines.append(f"device limit at the bundle size ({result['row_bytes']} B, 32 threads), "
                     f"random reads over {limit['file_note']}: "
                     f"{limit['read_gbps_at_bundle_size']:.2f} GB/s; a neuron read as one bundle "
                     f"instead of {_parts(result)} there: {limit['bundling_gain']:.2f}x the "
                     f"neurons "
                     f"per second")
        if "device_limit_unbundled" in result:
            split = result["device_limit_unbundled"]
            lines.append(f"unbundled copy ({result['row_bytes'] // result.get('row_parts', 2)} B"
                         f" parts, 32 threads), "
                         f"random reads over {split['file_note']}: "
                         f"{split['read_gbps_at_half_bundle_size']:.2f} GB/s; on those files a "
                         f"neuron read as one bundle instead of {_parts(result)}: "
                         f"{split['bundling_gain_same_files']:.2f}x the neurons per second")
        lines.append("achieved / device at the same read size and concurrency: " + ", ".join(
            f"{n} {r['device_fraction']:.0%}" for n, r in result["configs"].items()
            if r.get("device_fraction") is not None))
        same = {n: r for n, r in result["configs"].items()
                if r.get("device_fraction_same_batches") is not None}
        if same:
            lines.append("achieved / device for batches of the same size, read just after: "
                         + ", ".join(f"{n} {r['device_fraction_same_batches']:.0%} (batches of "
                                     f"{r['device_same_batches']['batch']}, "
                                     f"{r['device_same_batches']['gb_s']:.2f} GB/s)"
                                     for n, r in same.items()))
    return "\n".join(lines)


def markdown_table(result: dict) -> str:
    """The latency table as Markdown, one row per configuration, with each one's read rate
    against the device (sustained sweep, and batches of its own size read just after it)."""
    def pct(value):
        return "-" if value is None else f"{value:.0%}"

    head = ["configuration", "I/O ms", "memory ms", "predictor ms", "compute ms", "total ms",
            "flash MB/token", "storage/flash bytes", "rows per read", "read GB/s",
            "of device (sweep)", "of device (same batches)", "speedup"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in result["configs"].items():
        storage = (f"{r['storage_bytes_read'] / r['flash_bytes_read']:.2f}"
                   if r["storage_bytes_read"] is not None and r["flash_bytes_read"] else "-")
        cells = [name, *(f"{r[f'{p}_ms']:.1f}" for p in PHASES), f"**{r['ms_per_token']:.1f}**",
                 f"{r['flash_bytes_per_token'] / 1e6:.3f}", storage,
                 f"{r['rows_per_read_median']:.0f}", f"{r['read_gbps']:.2f}",
                 pct(r.get("device_fraction")), pct(r.get("device_fraction_same_batches")),
                 f"{r['speedup_vs_naive']:.1f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, out_dir) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    names = list(result["configs"])
    fig, ax = plt.subplots(figsize=(max(8.0, 1.4 * len(names)), 4.8))
    bottom = np.zeros(len(names))
    labels = [textwrap.fill(n, 14, break_long_words=False) for n in names]  # on a few lines
    for phase in PHASES:
        values = np.array([result["configs"][n][f"{phase}_ms"] for n in names])
        ax.bar(labels, values, bottom=bottom, label=phase)
        bottom += values
    ax.tick_params(axis="x", labelsize=8)
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
    ax.set(xlabel="window k (tokens)", ylabel="rows read per token (all layers)",
           title="rows read from flash vs window")
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
