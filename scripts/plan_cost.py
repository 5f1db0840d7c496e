"""What the neuron-cache plan costs inside a whole token: the compiled (numba) plan against
the numpy one, alternating in one process.

    python scripts/plan_cost.py MODEL_DIR --trace TRACE.npz [--dram-budget 50%] [--tokens 8]

Per round and kernel: the median ms per generated token and the plan's ms per token (every
layer's ``NeuronCache.plan`` call timed), predictor+window with the trace's needed sets.
"""

import argparse
import time

import numpy as np

import flashjax
from flashjax import cache
from flashjax.bench.run import load_options


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--trace")
    ap.add_argument("--dram-budget", default="50%")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    options = {"predictor": "trace", "trace": args.trace} if args.trace else {}
    model = flashjax.load(args.model_dir, dram_budget=args.dram_budget, window=4,
                          **load_options(args.model_dir, options))
    kernels = {"numba": cache._plan_kernel, "numpy": cache._plan_numpy}
    spent = []
    plan = cache.NeuronCache.plan

    def timed(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return plan(self, *a, **kw)
        finally:
            spent.append(time.perf_counter() - t0)

    cache.NeuronCache.plan = timed
    prompt = [2, 10]
    layers = model.cfg.num_hidden_layers
    for name, kernel in kernels.items():  # compile and warm both
        cache._plan_kernel = kernel
        model.generate(prompt, 2, stop_at_eos=False)
    for r in range(args.rounds):
        for name, kernel in kernels.items():
            cache._plan_kernel = kernel
            spent.clear()
            _, stats = model.generate(prompt, args.tokens, stop_at_eos=False, return_stats=True)
            total = np.array(stats["per_token"]["total_s"][len(prompt):])
            plans = np.array(spent).reshape(-1, layers).sum(axis=1)[len(prompt):]
            print(f"round {r} {name:<6} token {np.median(total) * 1e3:8.1f} ms  plan "
                  f"{np.median(plans) * 1e3:6.3f} ms ({np.median(plans / total):.2%} of the token)",
                  flush=True)


if __name__ == "__main__":
    main()
