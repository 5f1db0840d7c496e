"""What crosses host to device per token, and what the accelerator's transfer path costs on
CPU.

    python scripts/bench_transfers.py MODEL_DIR [--trace TRACE.npz] [--dram-budget 50%] \\
        [--tokens 8] [--rounds 3] [--out docs/bench/transfers]

Loads MODEL_DIR flash-backed twice per round, once with the CPU's transfers (host arrays
handed to the jitted calls as they are) and once with ``explicit_transfers=True`` (one
``device_put`` per transfer, as on an accelerator), and generates ``--tokens`` tokens from
the same prompt: the predictor (``--trace``: the trace's sets, as ``flashjax bench``), window
4. Per generated token it reports the rows read and their bytes, what crossed to the device
(rows as staged, padded to compiled sizes; the plan; the inputs) and what came back, and the
ms per token of each way (``flashjax bench``'s figure: its run, ``bench.run.run_config``). The two must give the same tokens and the same counts; the
script stops if they do not. Also the naive baseline's transfer per token (every row).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from flashjax.bench.run import chosen_predictor, run_config
from flashjax.engine.transfer import KINDS


def run(model_dir, budget, options, tokens, prompt):
    """One configuration through ``flashjax bench``'s own run, its figures renamed."""
    r = run_config(model_dir, budget, options, tokens, prompt_ids=prompt)
    return {
        "ids": r["ids"], "ms_per_token": r["ms_per_token"],
        "rows_read_per_token": r["rows_read_per_token"],
        "read_bytes_per_token": r["flash_bytes_per_token"],
        **{f"h2d_{k}_bytes_per_token": v for k, v in r["host_to_device_by_kind"].items()},
        "d2h_bytes_per_token": r["device_to_host_bytes_per_token"],
        "compute_device": r["compute_device"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("--trace")
    p.add_argument("--dram-budget", default="50%")
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--naive-tokens", type=int, default=2)
    p.add_argument("--out", default="docs/bench/transfers")
    args = p.parse_args(argv)
    if args.naive_tokens < 2 or args.tokens < 2:
        p.error("--tokens and --naive-tokens must be >= 2 (the first token comes from the "
                "prompt, the figures are over the tokens after it)")

    chosen = {**chosen_predictor((Path(args.model_dir) / "predictors").exists(), args.trace),
              "window": 4}
    prompt = [2, 100, 200, 300]
    runs = {False: [], True: []}
    for r in range(args.rounds):
        for explicit in (False, True):
            runs[explicit].append(run(args.model_dir, args.dram_budget,
                                      {**chosen, "explicit_transfers": explicit}, args.tokens,
                                      prompt))
            print(f"round {r + 1}, explicit={explicit}: "
                  f"{runs[explicit][-1]['ms_per_token']:.1f} ms/token", file=sys.stderr)
    keys = ["ids", "rows_read_per_token", *(f"h2d_{k}_bytes_per_token" for k in KINDS),
            "d2h_bytes_per_token"]
    for key in keys:
        values = [r[key] for rs in runs.values() for r in rs]
        if any(v != values[0] for v in values):
            sys.exit(f"the two paths differ in {key}: {values}")
    naive = run(args.model_dir, args.dram_budget, {"predictor": None}, args.naive_tokens, prompt)
    first = runs[False][0]
    result = {
        "command": " ".join(["python", "scripts/bench_transfers.py", *(argv or sys.argv[1:])]),
        "model": str(args.model_dir), "trace": args.trace, "dram_budget": args.dram_budget,
        "tokens": args.tokens, "rounds": args.rounds,
        "per_token": {k: first[k] for k in keys if k != "ids"},
        "read_bytes_per_token": first["read_bytes_per_token"],
        "padding_of_rows": first["h2d_rows_bytes_per_token"]
        / max(first["read_bytes_per_token"], 1) - 1,
        "ms_per_token": {"implicit": [r["ms_per_token"] for r in runs[False]],
                         "explicit": [r["ms_per_token"] for r in runs[True]]},
        "naive": {k: naive[k] for k in ("rows_read_per_token", "read_bytes_per_token",
                                        "h2d_rows_bytes_per_token", "h2d_plan_bytes_per_token",
                                        "ms_per_token")},
        "compute_device": first["compute_device"],
    }
    imp, exp = (float(np.median(result["ms_per_token"][k])) for k in ("implicit", "explicit"))
    result["explicit_over_implicit"] = exp / imp
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "transfers.json").write_text(json.dumps(result, indent=2) + "\n")
    t = result["per_token"]
    lines = [
        "| per generated token | predictor+window | naive |", "|---|---|---|",
        f"| rows read | {t['rows_read_per_token']:.0f} | {naive['rows_read_per_token']:.0f} |",
        f"| bytes read from flash (MB) | {first['read_bytes_per_token'] / 1e6:.3f} | "
        f"{naive['read_bytes_per_token'] / 1e6:.3f} |",
        f"| host -> device: rows as staged (MB) | {t['h2d_rows_bytes_per_token'] / 1e6:.3f} | "
        f"{naive['h2d_rows_bytes_per_token'] / 1e6:.3f} |",
        f"| host -> device: plan (KB) | {t['h2d_plan_bytes_per_token'] / 1e3:.1f} | "
        f"{naive['h2d_plan_bytes_per_token'] / 1e3:.1f} |",
        f"| host -> device: inputs (B) | {t['h2d_inputs_bytes_per_token']:.0f} | 0 |",
        f"| device -> host: scores (KB) | {t['d2h_bytes_per_token'] / 1e3:.1f} | 0 |",
        f"| ms per token, CPU path (median of rounds) | {imp:.1f} | {naive['ms_per_token']:.1f} |",
        f"| ms per token, explicit device_put (median of rounds) | {exp:.1f} | - |",
    ]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"padding of staged rows: {result['padding_of_rows']:.1%}; explicit / implicit "
          f"ms per token: {result['explicit_over_implicit']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
