"""What checking every flash row's checksum costs per token, measured in one process.

    python scripts/verify_cost.py MODEL_DIR [--trace TRACE.npz] [--dram-budget 50%]
        [--tokens 8] [--rounds 3] [--prompt-tokens 2]

One flash model is loaded once (trace-driven when ``--trace`` is given, else its own
predictors); its reader's checks are switched on and off between generations, alternating
``--rounds`` times, so both see the same machine state. Reports per setting the median ms per
token over all rounds, and, with checks on, the time spent inside the checks themselves (every
call timed), per token and as a share of the token.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import flashjax
from flashjax.bench.run import load_options
from flashjax.store import bundles


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("--trace")
    p.add_argument("--dram-budget", default="50%")
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=2)
    args = p.parse_args()

    options = {"predictor": "trace", "trace": args.trace} if args.trace else {}
    model = flashjax.load(args.model_dir, dram_budget=args.dram_budget,
                          **load_options(args.model_dir, options))
    checksums = model.reader.checksums
    assert checksums is not None, "verify_reads is the default: the reader holds the crcs"
    spent = [0.0]
    check = bundles.check_rows

    def timed(*a, **kw):
        t0 = time.perf_counter()
        try:
            return check(*a, **kw)
        finally:
            spent[0] += time.perf_counter() - t0

    bundles.check_rows = timed
    prompt = [model.cfg.bos_token_id, *range(10, 10 + args.prompt_tokens - 1)]
    model.generate(prompt, 2, stop_at_eos=False)  # compile
    per_token = {"checked": [], "unchecked": []}
    check_ms = []
    for _ in range(args.rounds):
        for name in ("checked", "unchecked"):
            model.reader.checksums = checksums if name == "checked" else None
            spent[0] = 0.0
            _, stats = model.generate(prompt, args.tokens, stop_at_eos=False,
                                      return_stats=True)
            per_token[name] += [t * 1e3 for t in stats["per_token"]["total_s"]]
            if name == "checked":
                check_ms.append(spent[0] * 1e3 / stats["tokens"])
            rows = float(np.mean(stats["rows_read_per_token"]))
    result = {name: float(np.median(v)) for name, v in per_token.items()}
    result["check_ms_per_token"] = float(np.median(check_ms))
    result["check_share"] = result["check_ms_per_token"] / result["checked"]
    result["rows_read_per_token"] = rows
    result["row_bytes"] = model.reader.row_bytes
    print(json.dumps(result, indent=1))
    print(f"ms per token: checked {result['checked']:.1f}, unchecked {result['unchecked']:.1f};"
          f" inside the checks {result['check_ms_per_token']:.2f} ms per token "
          f"({result['check_share']:.1%}) for {rows:.0f} rows of {result['row_bytes']} B")


if __name__ == "__main__":
    main()
