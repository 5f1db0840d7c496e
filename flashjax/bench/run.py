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
import os
import textwrap
import time
from pathlib import Path

import numpy as np

import flashjax
from flashjax.engine.transfer import device_info, device_label
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
                              seconds: float, parts: int = 2,
                              split_root: Path | None = None) -> None:
    """Add to row-set configuration ``r``, just after it ran, the device's rate for reads of
    its own size in batches of its own median size at its concurrency, over the files it read
    (``batch_rate``), and the fraction of that it achieved: the device's figure for the
    engine's own pattern, measured at the same time (the storage's rate drifts during a run)."""
    from flashjax.bench.device import batch_rate

    if _streaming(r["options"]) or not r["rows_per_read_median"]:
        return
    bundled = r["options"].get("bundled", True)
    files = sorted((model_dir / bundles.FFN_DIR).glob("layer_*/c/0/0")) if bundled else \
        sorted((Path(split_root or model_dir) / bundles.SPLIT_DIR).glob("*/c/0/0"))
    reads = round(r["rows_per_read_median"]) * (1 if bundled else parts)  # unbundled: a read
    # per part
    rate = batch_rate(files, chunk=_whole_blocks(row_bytes if bundled else row_bytes // parts),
                      batch=reads, concurrency=r["reader_threads"], seconds=seconds)
    r["device_same_batches"] = rate
    r["device_fraction_same_batches"] = (_achieved_gbps(r) / rate["gb_s"]
                                         if rate and rate["gb_s"] > 0 else None)


def median_token(per: dict[str, np.ndarray]) -> dict[str, float]:
    """Milliseconds per phase of the median token (by total; the two middle tokens averaged
    for an even count), so that the phases add up to the median total the table shows."""
    total = sum(per.values())
    if total.size == 0:
        return {p: 0.0 for p in per}
    order = np.argsort(total, kind="stable")
    mid = order[[(total.size - 1) // 2, total.size // 2]]
    return {p: float(per[p][mid].mean() * 1e3) for p in per}


def run_config(model_dir, budget, options: dict, tokens: int,
               prompt_tokens: int | None = None, prompt_ids: list[int] | None = None,
               on_token=None) -> dict:
    model = flashjax.load(model_dir, dram_budget=budget, **load_options(model_dir, options))
    prompt = prompt_ids if prompt_ids is not None else _prompt_ids(
        Path(model_dir), Manifest.read(model_dir), prompt_tokens)
    model.generate(prompt[:2], 2, stop_at_eos=False)  # compile everything first
    stamps = []

    def stamp(_ids):
        stamps.append(time.perf_counter())
        if on_token is not None:
            on_token(_ids)

    ids, stats = model.generate(prompt, tokens, stop_at_eos=False, return_stats=True,
                                on_token=stamp)
    decode = slice(len(prompt), None)  # per-token figures over generated tokens only
    per = {p: np.array(stats["per_token"][f"{p}_s"][decode]) for p in PHASES}
    breakdown = median_token(per)
    rows = np.array(stats["rows_read_per_token"][decode])
    row_bytes = model.reader.row_bytes
    io_s = per["io"].sum()
    io_all = sum(stats["per_token"]["io_s"])
    reads = np.array(stats["rows_per_read"] or [0])
    moved = {k: float(np.mean(v[decode]))
             for k, v in stats["host_to_device_bytes_per_token"].items()}
    result = {
        "options": options,
        "ms_per_token": float(sum(breakdown.values())),
        **{f"{p}_ms": breakdown[p] for p in PHASES},  # of the median token: they add up
        **{f"{p}_ms_median": float(np.median(per[p]) * 1e3) for p in PHASES},
        # wall time between chosen tokens: what the peers' rows measure too
        "wall_ms_per_token": float(np.median(np.diff(stamps)) * 1e3) if len(stamps) > 1
        else None,
        "flash_bytes_per_token": float(rows.mean() * row_bytes),
        "read_gbps": float(rows.sum() * row_bytes / io_s / 1e9) if io_s > 0 else 0.0,
        # what the device delivered, rows below a 4 KiB block costing a whole block
        "storage_gbps": float(stats["storage_bytes_read"] / io_all / 1e9)
        if io_all > 0 and stats["storage_bytes_read"] is not None else None,
        # (the count covers every step, the prompt's included: per step, as for the peers)
        "storage_bytes_per_token": float(stats["storage_bytes_read"] / max(stats["tokens"], 1))
        if stats["storage_bytes_read"] is not None else None,
        "rows_per_read_median": float(np.median(reads)),
        "requests_per_token": float(np.mean(stats["requests_per_token"][decode])),
        "mean_request_bytes": float(sum(stats["request_bytes_per_token"][decode])
                                    / max(sum(stats["requests_per_token"][decode]), 1)),
        "reader_threads": model.options.reader_threads,
        "rows_read_per_token": float(rows.mean()),
        "rows_streamed": stats["rows_streamed"],
        "rows_needed_per_token": stats["rows_needed"] / max(stats["tokens"], 1),
        "rows_dropped": stats["rows_dropped"],
        "flash_bytes_read": stats["flash_bytes_read"],
        "storage_bytes_read": stats["storage_bytes_read"],
        "peak_dram_bytes": stats["peak_dram_bytes"],
        "budget_bytes": stats["dram_budget_bytes"],
        "resident_dtype": _resident_dtype(model),
        # what crossed to the compute device per generated token (means, as the flash bytes),
        # by kind (rows, plan, inputs) and in all, and what came back
        "host_to_device_by_kind": moved,
        "host_to_device_bytes_per_token": sum(moved.values()),
        "host_to_device_row_bytes_per_token": moved["rows"],
        "device_to_host_bytes_per_token": float(np.mean(
            stats["device_to_host_bytes_per_token"][decode])),
        "compute_device": stats["compute_device"],
        "capacity": stats["capacity"],
        "ids": [int(i) for i in ids],
        "tokens": len(ids),
    }
    del model
    gc.collect()
    return result


def _resident_dtype(model) -> str:
    import jax

    return str(max((leaf.dtype for leaf in jax.tree.leaves(model.params)),
                   key=lambda d: d.itemsize))


def unbundled_bytes(manifest: Manifest) -> int:
    """The size of the unbundled copy: the FFN rows once more."""
    cfg = manifest.config
    return manifest.row_bytes * cfg.ffn_dim * cfg.num_hidden_layers


def stored_bytes(*paths) -> int:
    """Bytes of the files under ``paths`` (a checkpoint's weights, a store)."""
    from flashjax.bench.limits import files_under

    return sum(f.stat().st_size for f in files_under(*paths))


def checkpoint_files(hf_dir) -> list[Path]:
    hf_dir = Path(hf_dir)
    return sorted(hf_dir.glob("*.safetensors")) + sorted(hf_dir.glob("*.json"))


def _budget_bytes(model_dir: Path, manifest: Manifest, dram_budget) -> int:
    from flashjax.budget import dense_bytes, parse_budget
    from flashjax.runtime import default_compute_dtype

    return parse_budget(dram_budget, dense_bytes(manifest, default_compute_dtype(
        manifest.dtype)))


# Every worker, ours and the peers', runs with glibc's malloc held to two arenas: with the
# default (eight per core) the threads of XLA and of the reads keep freed memory in arenas of
# their own, which a memory limit counts (at OPT-1.3B shape, 1.4 GB budget: peak RSS 2.35 GB
# with the default, 2.17-2.21 GB with two arenas, steady 2.34 against 1.75-1.77 GB).
WORKER_ENV = {"MALLOC_ARENA_MAX": "2"}


class _Isolated:
    """Runs configurations one per worker process (``flashjax.bench.worker``), inside a
    memory cgroup of ``limit`` bytes when one is given, with the files of ``evict_paths``
    dropped from the page cache before each run."""

    def __init__(self, limit: int | None, evict_paths, progress: bool, scratch: Path):
        self.limit, self.evict_paths, self.progress = limit, list(evict_paths), progress
        self.scratch = scratch
        self.count = 0

    def __call__(self, name: str, spec: dict, limited: bool = True) -> dict:
        """Run one configuration; ``limited`` False: outside the memory limit (the dense
        reference)."""
        import subprocess
        import sys

        from flashjax.bench import limits

        limit = self.limit if limited else None
        self.count += 1
        spec_path = self.scratch / f"spec-{self.count}.json"
        out_path = self.scratch / f"out-{self.count}.json"
        spec_path.write_text(json.dumps({**spec, "name": name, "progress": self.progress},
                                        default=str))
        evicted = limits.evict(*self.evict_paths)
        cmd = [sys.executable, "-m", "flashjax.bench.worker", str(spec_path), str(out_path)]
        env = {**os.environ, **WORKER_ENV}
        start = time.perf_counter()
        if limit is None:
            code = subprocess.run(cmd, env=env).returncode
            run = {"returncode": code, "killed": code < 0, "limit_bytes": None,
                   "peak_bytes": None, "oom_kills": 0, "cgroup": None,
                   "seconds": time.perf_counter() - start}
        else:
            run = limits.run_limited(cmd, limit, env=env).as_dict()
        result = json.loads(out_path.read_text()) if out_path.exists() and \
            run["returncode"] == 0 else {}
        result.update(process=run, evicted_bytes=evicted, completed=run["returncode"] == 0)
        return result


def bench(model_dir, *, dram_budget="50%", tokens: int = 16, window: int = 4,
          windows=(1, 2, 4, 8), device: bool = True, device_seconds: float = 0.5,
          trace: str | None = None, prompt_tokens: int | None = None,
          progress: bool = True, peers: str | None = None, memory_limit=None,
          runtime_allowance: int = 1 << 30, keep_unbundled: bool = False,
          only: list[str] | None = None) -> dict:
    """Run every configuration (and the window sweep) on ``model_dir`` under ``dram_budget``;
    with ``device`` also the storage's random-read limit, against which each configuration's
    read throughput is put at its own row size and concurrency (``device_fraction``).

    ``peers``: the Hugging Face checkpoint the store was converted from; adds the peers of
    ``flashjax.bench.peers`` on the same prompt, and a dense reference whose greedy tokens
    every configuration is checked against. ``memory_limit`` (bytes, or "auto": the budget
    plus ``runtime_allowance``) runs every configuration in its own process inside a memory
    cgroup of that size, with the store's and checkpoint's pages evicted before each run.
    ``only``: run just these configurations (names as in the table, peers included)."""
    import shutil
    import tempfile

    model_dir = Path(model_dir)
    manifest = Manifest.read(model_dir)
    parts = len(manifest.config.ffn_parts)  # reads per neuron unbundled
    has_predictors = (model_dir / "predictors").exists()
    budget_bytes = _budget_bytes(model_dir, manifest, dram_budget)
    if memory_limit == "auto":
        memory_limit = budget_bytes + runtime_allowance
    isolate = memory_limit is not None or peers is not None
    if memory_limit is not None:
        from flashjax.bench.limits import CgroupUnavailable, available

        why = available()
        if why is not None:
            raise CgroupUnavailable(f"--memory-limit: {why}")
    configs = configurations(has_predictors, window, trace)
    if only is not None:
        unknown = set(only) - set(configs) - {*peers_names(peers)}
        if unknown:
            raise ValueError(f"unknown configuration(s) {sorted(unknown)}; choose from "
                             f"{[*configs, *peers_names(peers)]}")
        configs = {n: o for n, o in configs.items() if n in only or n == "naive"}
    skipped = {}
    if manifest.quant is not None:  # the unbundled copy is written for float stores only
        skipped = {n: f"an {manifest.ffn_dtype} store is read bundled only"
                   for n, o in configs.items() if not o.get("bundled", True)}
        configs = {n: o for n, o in configs.items() if n not in skipped}
    unbundled = any(not o.get("bundled", True) for o in configs.values())
    result = {"model": str(model_dir), "dram_budget": dram_budget, "tokens": tokens,
              "budget_bytes": budget_bytes, "row_bytes": manifest.row_bytes,
              "row_parts": parts, "trace": trace, "memory_limit_bytes": memory_limit,
              "runtime_allowance_bytes": runtime_allowance if memory_limit else None,
              "worker_env": WORKER_ENV if isolate else None,
              "store_bytes": stored_bytes(*(p for p in model_dir.iterdir()
                                            if p.name != bundles.SPLIT_DIR)),
              "ffn_dtype": manifest.ffn_dtype, "skipped": skipped,
              "compute_device": device_info(), "configs": {}}
    if peers is not None:
        result["peers_checkpoint"] = str(peers)
        result["checkpoint_bytes"] = stored_bytes(*Path(peers).glob("*.safetensors"))
    stored = result.get("checkpoint_bytes") or result["store_bytes"]
    result["budget_of_stored_model"] = budget_bytes / stored
    if memory_limit is not None:
        result["memory_limit_of_stored_model"] = memory_limit / stored

    split_root, made_split = model_dir, False
    if unbundled:
        # in the model dir with --keep-unbundled (or kept there by an earlier such run)
        if not keep_unbundled and not (model_dir / bundles.SPLIT_DIR / "complete").exists():
            try:  # beside the store: on the same device, so its reads compare
                split_root = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}-unbundled-",
                                                   dir=model_dir.parent))
            except OSError:
                split_root = Path(tempfile.mkdtemp(prefix="flashjax-unbundled-"))
            made_split = True
        if not (split_root / bundles.SPLIT_DIR / "complete").exists() and progress:
            print(f"bench: writing the unbundled copy of the FFN that bundling is compared "
                  f"with ({unbundled_bytes(manifest) / 1e9:.2f} GB) into {split_root}"
                  f"{'' if made_split else ' (kept: --keep-unbundled)'}"
                  f"{'; it is removed at the end' if made_split else ''}", flush=True)
        bundles.write_split(model_dir, split_root, progress=progress)
        for name, options in configs.items():
            if not options.get("bundled", True) and split_root != model_dir:
                configs[name] = {**options, "unbundled_dir": str(split_root)}
    scratch = Path(tempfile.mkdtemp(prefix="flashjax-bench-"))
    try:
        _run_all(result, model_dir, configs, budget_bytes, dram_budget, tokens, window, windows,
                 device, device_seconds, trace, prompt_tokens, progress, peers, memory_limit,
                 isolate, has_predictors, manifest, parts, split_root, scratch, only)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if made_split:
            shutil.rmtree(split_root, ignore_errors=True)
    return result


def peers_names(peers) -> tuple[str, ...]:
    from flashjax.bench.peers import PEERS

    return PEERS if peers is not None else ()


def _prompt_ids(model_dir: Path, manifest: Manifest, prompt_tokens: int | None) -> list[int]:
    """The prompt every configuration and peer runs: the fixed text through the model's
    tokenizer, or (``prompt_tokens``, or without a tokenizer) that many ids."""
    from flashjax.runtime import encode
    from flashjax.store.load import load_tokenizer

    cfg = manifest.config
    tokenizer = load_tokenizer(model_dir, manifest)
    if tokenizer is not None and prompt_tokens is None:
        return encode(tokenizer, cfg, PROMPT_TEXT)
    return [cfg.bos_token_id, *range(10, 10 + (prompt_tokens or 10) - 1)]


def _accelerate_memories(limit: int | None, budget: int) -> list[int]:
    """``max_memory`` values to try for accelerate-offload, largest first: from the budget
    down, until one keeps the process within the limit."""
    start = budget if limit is None else min(budget, limit)
    return [int(start * f) for f in (1.0, 0.75, 0.55, 0.4, 0.25)]


def _run_all(result, model_dir, configs, budget_bytes, dram_budget, tokens, window, windows,
             device, device_seconds, trace, prompt_tokens, progress, peers, memory_limit,
             isolate, has_predictors, manifest, parts, split_root, scratch, only) -> None:
    prompt = _prompt_ids(model_dir, manifest, prompt_tokens)
    result["prompt_ids"] = prompt
    evict_paths = [model_dir] + ([peers] if peers is not None else []) + (
        [split_root / bundles.SPLIT_DIR] if split_root != model_dir else [])
    isolated = _Isolated(memory_limit, evict_paths, progress, scratch) if isolate else None
    for name, options in configs.items():
        if progress:
            print(f"bench: {name} ...", flush=True)
        if isolated is None:
            r = run_config(model_dir, dram_budget, options, tokens, prompt_ids=prompt,
                           on_token=_token_bar(name, tokens, progress))
        else:
            r = isolated(name, {"kind": "flashjax", "model_dir": str(model_dir),
                                "budget": dram_budget, "options": options, "tokens": tokens,
                                "prompt_ids": prompt})
            r.setdefault("options", options)
            _runtime(r)
        r["kind"] = "flashjax"
        result["configs"][name] = r
        if device and r.get("completed", True):
            compare_with_same_batches(r, model_dir, manifest.row_bytes, device_seconds, parts,
                                      split_root)
    if peers is not None:
        wanted = [p for p in peers_names(peers) if only is None or p in only]
        _run_peers(result, isolated, peers, prompt, tokens, budget_bytes, memory_limit,
                   scratch, wanted, progress)
        if progress:
            print("bench: dense reference ...", flush=True)
        _check_tokens(result, isolated, model_dir, manifest, prompt, tokens)
    naive = result["configs"]["naive"].get("ms_per_token")
    naive_wall = result["configs"]["naive"].get("wall_ms_per_token")
    for r in result["configs"].values():
        ms = r.get("ms_per_token")
        r["speedup_vs_naive"] = naive / ms if naive and ms else None
        wall = r.get("wall_ms_per_token")
        r["wall_speedup_vs_naive"] = naive_wall / wall if naive_wall and wall else None
    if only is None:
        chosen = chosen_predictor(has_predictors, trace)
        sweep = {}
        for k in windows:  # reuse the configurations already run with these options
            done = next((result["configs"][n] for n, o in configs.items()
                         if o == {**chosen, "window": k}), None)
            sweep[str(k)] = (done or run_config(model_dir, dram_budget,
                                                {**chosen, "window": k}, tokens,
                                                prompt_ids=prompt))["rows_read_per_token"]
        result["window_sweep"] = sweep
    if device:
        _device_limits(result, model_dir, manifest, parts, split_root, device_seconds,
                       progress)


def _token_bar(name: str, tokens: int, progress: bool):
    if not progress:
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=tokens, desc=name, unit="token", leave=False)

    def update(ids):
        bar.update(1)
        if bar.n >= tokens:
            bar.close()

    return update


def _runtime(r: dict) -> None:
    """The memory a configuration used beyond its planned DRAM: runtime, libraries, copies."""
    if r.get("max_rss_bytes") is not None and r.get("peak_dram_bytes") is not None:
        r["runtime_bytes"] = r["max_rss_bytes"] - r["peak_dram_bytes"]


def _run_peers(result, isolated, hf_dir, prompt, tokens, budget_bytes, memory_limit, scratch,
               wanted, progress) -> None:
    import shutil

    for peer in wanted:
        if progress:
            print(f"bench: {peer} ...", flush=True)
        spec = {"kind": peer, "hf_dir": str(hf_dir), "prompt_ids": prompt, "tokens": tokens}
        if peer != "accelerate-offload":
            r = isolated(peer, spec)
        else:  # the largest max_memory that runs within the limit
            attempts = []
            for memory in _accelerate_memories(memory_limit, budget_bytes):
                offload = scratch / f"offload-{len(attempts)}"
                r = isolated(peer, {**spec, "max_memory": memory, "offload_dir": str(offload)})
                shutil.rmtree(offload, ignore_errors=True)
                attempts.append({"max_memory_bytes": memory, "completed": r["completed"],
                                 "killed": r["process"]["killed"],
                                 "peak_bytes": r["process"]["peak_bytes"]})
                if r["completed"] or not r["process"]["killed"]:
                    break
                if progress:
                    print(f"bench: {peer} with max_memory {memory / 1e9:.2f} GB was killed at "
                          f"the limit; trying less", flush=True)
            r["attempts"] = attempts
        r["kind"] = "peer"
        r["options"] = {"peer": peer}
        result["configs"][peer] = r


def _check_tokens(result, isolated, model_dir, manifest, prompt, tokens) -> None:
    """Every configuration's greedy tokens against the dense model's (every weight in DRAM,
    float32, no limit); where that does not fit this machine's memory, against naive flash
    loading, which computes the same (tests/test_engine.py)."""
    from flashjax.budget import dense_bytes

    need = dense_bytes(manifest, "float32") + (1 << 30)
    available = _mem_available()
    ref, source, why = None, None, "dense does not fit this machine's memory"
    if available is None or need < available:
        r = isolated("dense", {"kind": "dense", "model_dir": str(model_dir),
                               "prompt_ids": prompt, "tokens": tokens}, limited=False)
        if r["completed"]:
            ref, source = r.get("ids"), "dense"
        else:
            why = f"the dense run failed (exit {r['process']['returncode']})"
    if ref is None and result["configs"]["naive"].get("ids"):
        ref, source = result["configs"]["naive"]["ids"], f"naive flash loading ({why})"
    result["reference_tokens"] = {"source": source, "ids": ref}
    for r in result["configs"].values():
        ids = r.get("ids")
        r["same_tokens_as_dense"] = None if ids is None or ref is None else ids == ref


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _device_limits(result, model_dir, manifest, parts, split_root, device_seconds,
                   progress) -> None:
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
    ours = {n: r for n, r in result["configs"].items()
            if r.get("kind") == "flashjax" and r.get("completed", True)}
    if any(not r["options"].get("bundled", True) for r in ours.values()):
        split = sorted((split_root / bundles.SPLIT_DIR).glob("*/c/0/0"))
        half = _whole_blocks(manifest.row_bytes // parts)  # (a third for gated FFNs)
        whole = _whole_blocks(manifest.row_bytes)
        split_limit = device_limit(split, chunk_sizes=sorted({half, whole}),
                                   concurrencies=(1, 4, 8, 16, 32, 64),
                                   seconds=device_seconds, progress=progress)
        split_limit["read_gbps_at_half_bundle_size"] = _device_gbps_at(split_limit, half, 32)
        split_limit["bundling_gain_same_files"] = bundling_gain(
            split_limit, manifest.row_bytes, parts=parts)
        result["device_limit_unbundled"] = split_limit
    for r in ours.values():
        unbundled = not r["options"].get("bundled", True)
        compare_with_device(r, split_limit if unbundled else limit, manifest.row_bytes, parts)


def _parts(result: dict) -> str:
    return {2: "two halves", 3: "three thirds"}.get(result.get("row_parts", 2), "its parts")


def format_table(result: dict) -> str:
    """The paper's latency table: one row per configuration."""
    head = (f"{'configuration':<30}{'I/O':>8}{'memory':>8}{'predict':>8}{'compute':>9}"
            f"{'total':>9}{'flash MB':>10}{'GB/s':>7}{'speedup':>9}")
    dtype = result.get("ffn_dtype")
    lines = [f"ms per generated token (the median token's phases), DRAM budget "
             f"{result['dram_budget']}" + (f", {dtype} FFN rows" if dtype else "")
             + _computed_on(result), head]
    for name, r in _ours(result).items():
        lines.append(f"{name:<30}{r['io_ms']:>8.1f}{r['memory_ms']:>8.1f}"
                     f"{r['predictor_ms']:>8.1f}{r['compute_ms']:>9.1f}{r['ms_per_token']:>9.1f}"
                     f"{r['flash_bytes_per_token'] / 1e6:>10.3f}{r['read_gbps']:>7.2f}"
                     f"{r['speedup_vs_naive']:>8.1f}x")
    lines.append("storage bytes / flash bytes per configuration: " + ", ".join(
        f"{n} {r['storage_bytes_read'] / max(r['flash_bytes_read'], 1):.2f}"
        for n, r in _ours(result).items() if r["storage_bytes_read"] is not None))
    lines.append("storage requests per token (mean request): " + ", ".join(
        f"{n} {r['requests_per_token']:.0f} ({r['mean_request_bytes'] / 1024:.1f} KiB)"
        for n, r in _ours(result).items() if "requests_per_token" in r))
    moved = {n: r for n, r in _ours(result).items() if "host_to_device_bytes_per_token" in r}
    if moved:
        lines.append("host -> device MB per token (of it rows; device -> host): " + ", ".join(
            f"{n} {r['host_to_device_bytes_per_token'] / 1e6:.3f} "
            f"({r['host_to_device_row_bytes_per_token'] / 1e6:.3f}; "
            f"{r['device_to_host_bytes_per_token'] / 1e6:.3f})" for n, r in moved.items()))
    for name, why in result.get("skipped", {}).items():
        lines.append(f"not run: {name} ({why})")
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
            f"{n} {r['device_fraction']:.0%}" for n, r in _ours(result).items()
            if r.get("device_fraction") is not None))
        same = {n: r for n, r in _ours(result).items()
                if r.get("device_fraction_same_batches") is not None}
        if same:
            lines.append("achieved / device for batches of the same size, read just after: "
                         + ", ".join(f"{n} {r['device_fraction_same_batches']:.0%} (batches of "
                                     f"{r['device_same_batches']['batch']}, "
                                     f"{r['device_same_batches']['gb_s']:.2f} GB/s)"
                                     for n, r in same.items()))
    if _isolated(result):
        lines += ["", format_limited(result)]
    return "\n".join(lines)


def _computed_on(result: dict) -> str:
    device = result.get("compute_device")
    return f", computed on {device_label(device)}" if device else ""


def _ours(result: dict) -> dict:
    """flashjax's configurations that completed (the ones with phase figures)."""
    return {n: r for n, r in result["configs"].items()
            if r.get("kind", "flashjax") == "flashjax" and r.get("completed", True)
            and "io_ms" in r}


def _isolated(result: dict) -> bool:
    return any("process" in r for r in result["configs"].values())


def _gb(value) -> str:
    return "-" if value is None else f"{value / 1e9:.2f}"


def limited_rows(result: dict) -> list[dict]:
    """One row per configuration and peer as run in its own process: wall ms per token, the
    storage bytes it read per token, the memory the kernel saw, and its tokens against the
    dense model's."""
    rows = []
    for name, r in result["configs"].items():
        proc = r.get("process", {})
        same = r.get("same_tokens_as_dense")
        if not r.get("completed", True):
            verdict = "killed at the limit" if proc.get("killed") else \
                f"failed (exit {proc.get('returncode')})"
        elif same is False and r.get("options", {}).get("predictor") == "trace":
            verdict = "other (a trace's row sets, not this model's activity)"
        else:
            verdict = {True: "same", False: "different", None: "-"}[same]
        rows.append({
            "name": name, "ms": r.get("wall_ms_per_token"),
            "storage": r.get("storage_bytes_per_token"),
            "limit": proc.get("limit_bytes"), "peak": proc.get("peak_bytes"),
            "rss": r.get("max_rss_bytes"), "planned": r.get("peak_dram_bytes"),
            "runtime": r.get("runtime_bytes"), "tokens": verdict,
            "dtype": r.get("resident_dtype") or r.get("compute_dtype"),
            "note": (f"max_memory {r['max_memory_bytes'] / 1e9:.2f} GB"
                     if r.get("max_memory_bytes") else ""),
        })
    return rows


def format_limited(result: dict) -> str:
    limit = result.get("memory_limit_bytes")
    head = (f"{'configuration':<30}{'ms/token':>10}{'storage MB':>12}{'peak GB':>9}"
            f"{'RSS GB':>8}{'runtime GB':>11}  tokens vs dense")
    title = ("each configuration in its own process" + (
        f", memory cgroup of {limit / 1e9:.2f} GB ({result['memory_limit_of_stored_model']:.0%}"
        f" of the stored model), pages evicted first" if limit else ""))
    lines = [title + "; wall ms per token (median)", head]
    for row in limited_rows(result):
        ms = "-" if row["ms"] is None else f"{row['ms']:.1f}"
        storage = "-" if row["storage"] is None else f"{row['storage'] / 1e6:.1f}"
        lines.append(f"{row['name']:<30}{ms:>10}{storage:>12}{_gb(row['peak']):>9}"
                     f"{_gb(row['rss']):>8}{_gb(row['runtime']):>11}  {row['tokens']}"
                     + (f" ({row['note']})" if row["note"] else ""))
    ref = result.get("reference_tokens", {}).get("source")
    if ref:
        lines.append(f"tokens compared with: {ref}")
    return "\n".join(lines)


def markdown_limited(result: dict) -> str:
    head = ["configuration", "ms per token", "storage MB per token", "memory limit GB",
            "cgroup peak GB", "max RSS GB", "planned DRAM GB", "runtime GB", "dtype",
            "tokens vs dense", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in limited_rows(result):
        cells = [row["name"], "-" if row["ms"] is None else f"**{row['ms']:.1f}**",
                 "-" if row["storage"] is None else f"{row['storage'] / 1e6:.1f}",
                 _gb(row["limit"]), _gb(row["peak"]), _gb(row["rss"]), _gb(row["planned"]),
                 _gb(row["runtime"]), row["dtype"] or "-", row["tokens"], row["note"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_table(result: dict) -> str:
    """The latency table as Markdown, one row per configuration, with each one's read rate
    against the device (sustained sweep, and batches of its own size read just after it)."""
    def pct(value):
        return "-" if value is None else f"{value:.0%}"

    head = ["configuration", "I/O ms", "memory ms", "predictor ms", "compute ms", "total ms",
            "flash MB/token", "storage/flash bytes", "rows per read", "read GB/s",
            "of device (sweep)", "of device (same batches)", "host->device MB/token",
            "speedup"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in _ours(result).items():
        storage = (f"{r['storage_bytes_read'] / r['flash_bytes_read']:.2f}"
                   if r["storage_bytes_read"] is not None and r["flash_bytes_read"] else "-")
        cells = [name, *(f"{r[f'{p}_ms']:.1f}" for p in PHASES), f"**{r['ms_per_token']:.1f}**",
                 f"{r['flash_bytes_per_token'] / 1e6:.3f}", storage,
                 f"{r['rows_per_read_median']:.0f}", f"{r['read_gbps']:.2f}",
                 pct(r.get("device_fraction")), pct(r.get("device_fraction_same_batches")),
                 "-" if "host_to_device_bytes_per_token" not in r
                 else f"{r['host_to_device_bytes_per_token'] / 1e6:.3f}",
                 f"{r['speedup_vs_naive']:.1f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    on = _computed_on(result)
    return (f"Computed on {on[len(', computed on '):]}.\n\n" if on else "") + \
        "\n".join(lines) + "\n"


def plot(result: dict, out_dir) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    names = list(_ours(result))
    fig, ax = plt.subplots(figsize=(max(8.0, 1.4 * len(names)), 4.8))
    bottom = np.zeros(len(names))
    labels = [textwrap.fill(n, 14, break_long_words=False) for n in names]  # on a few lines
    for phase in PHASES:
        values = np.array([result["configs"][n][f"{phase}_ms"] for n in names])
        ax.bar(labels, values, bottom=bottom, label=phase)
        bottom += values
    ax.tick_params(axis="x", labelsize=8)
    for i, n in enumerate(names):  # the table's total, which the phases add up to
        ax.annotate(f"{result['configs'][n]['ms_per_token']:.1f}", (i, bottom[i]),
                    ha="center", va="bottom", fontsize=8)
    ax.set(ylabel="ms per token (the median token's phases)",
           title=f"latency breakdown, DRAM budget {result['dram_budget']}")
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "latency_breakdown.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    if _isolated(result):
        paths.append(plot_limited(result, out_dir / "memory_limit.png"))
    if "window_sweep" not in result:
        return paths
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


def plot_limited(result: dict, path) -> Path:
    """Wall ms per token of every configuration and peer (log scale), next to the memory the
    kernel saw each use, against the limit."""
    import matplotlib.pyplot as plt

    rows = limited_rows(result)
    labels = [textwrap.fill(r["name"], 14, break_long_words=False) for r in rows]
    fig, (ax, mem) = plt.subplots(1, 2, figsize=(max(10.0, 2.2 * len(rows)), 4.8))
    ms = [r["ms"] or 0 for r in rows]
    bars = ax.bar(labels, ms, color=["tab:blue" if r["tokens"] in ("same", "-") else
                                     "tab:orange" if r["ms"] else "tab:gray" for r in rows])
    for bar, r in zip(bars, rows):
        text = f"{r['ms']:.0f}" if r["ms"] else r["tokens"]
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, max(bar.get_height(), 1)),
                    ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set(ylabel="wall ms per token (median, log)", title="per token (orange: tokens other "
           "than dense's)")
    ax.tick_params(axis="x", labelsize=8)
    x = np.arange(len(rows))
    mem.bar(x - 0.2, [(r["peak"] or 0) / 1e9 for r in rows], 0.4, color="tab:green",
            label="cgroup peak (RSS + page cache)")
    mem.bar(x + 0.2, [(r["rss"] or 0) / 1e9 for r in rows], 0.4, color="tab:olive",
            label="process max RSS")
    mem.set_xticks(x, labels)
    limit = result.get("memory_limit_bytes")
    if limit:
        mem.axhline(limit / 1e9, color="tab:red", linestyle="--", label="memory limit")
    mem.legend(fontsize=8, loc="lower right")
    mem.set(ylabel="GB", title="memory the kernel counted")
    mem.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def save_json(result: dict, path) -> None:
    Path(path).write_text(json.dumps(result, indent=1, default=str))
