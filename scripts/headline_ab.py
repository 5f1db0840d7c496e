"""Naive against predictor+window on one store, with checked and unchecked reads, in one run.

    python scripts/headline_ab.py MODEL_DIR --trace TRACE.npz [--dram-budget 50%] [--tokens 6]
        [--prompt-tokens 2] [--json OUT.json]

For each configuration one model is loaded; its reader's row checks are switched on and off
between generations (checked first), so both settings see the same loaded process. Prints the
median ms per token and its I/O, memory, predictor and compute parts for each pair, and the
storage bytes read per flash byte (``/proc/self/io``): what the comparison of
``flashjax bench`` would give with and without ``--no-verify-reads``, measured side by side.
"""

from __future__ import annotations

import argparse
import json

import flashjax
from flashjax.bench.run import load_options


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("--trace", required=True)
    p.add_argument("--dram-budget", default="50%")
    p.add_argument("--tokens", type=int, default=6)
    p.add_argument("--prompt-tokens", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args()
    configs = {"naive": {"predictor": None},
               "predictor+window": {"predictor": "trace", "trace": args.trace, "window": 4}}
    results = {}
    for name, options in configs.items():
        model = flashjax.load(args.model_dir, dram_budget=args.dram_budget,
                              **load_options(args.model_dir, options))
        prompt = [model.cfg.bos_token_id, *range(10, 10 + args.prompt_tokens - 1)]
        model.generate(prompt, 2, stop_at_eos=False)  # compile
        checksums = model.reader.checksums
        for checked in (True, False):
            model.reader.checksums = checksums if checked else None
            _, stats = model.generate(prompt, args.tokens, stop_at_eos=False, return_stats=True)
            key = f"{name}, {'checked' if checked else 'unchecked'}"
            results[key] = {f"{ph}_ms": stats[f"median_{ph}_s"] * 1e3
                            for ph in ("io", "memory", "predictor", "compute", "total")}
            results[key]["storage_per_flash_byte"] = (
                stats["storage_bytes_read"] / max(stats["flash_bytes_read"], 1)
                if stats["storage_bytes_read"] is not None else None)
            print(key, {k: round(v, 2) for k, v in results[key].items() if v is not None},
                  flush=True)
        del model
    for checked in ("checked", "unchecked"):
        ratio = results[f"naive, {checked}"]["total_ms"] / \
            results[f"predictor+window, {checked}"]["total_ms"]
        print(f"{checked}: predictor+window {ratio:.1f}x faster than naive")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
