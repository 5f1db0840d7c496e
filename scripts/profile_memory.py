"""Where memory management's host time goes: the cache plan and the row-update dispatches.

    python scripts/profile_memory.py MODEL_DIR [--dram-budget 50%] [--tokens 40] [--window 4]
                                     [--trace TRACE.npz]

Generates ``--tokens`` tokens with the model's predictors (or an activity trace) and times,
per call, each layer's ``NeuronCache.plan``, the jitted buffer-update dispatches and the
building of their int32 argument; then replays the very same plans on fresh caches in a tight
loop, which shows what the plan costs with the CPU's caches warm. Medians in µs; the memory
phase's median per token as the engine counts it.
"""

import argparse
import collections
import time

import numpy as np

import flashjax
from flashjax import cache
from flashjax.bench.run import load_options
from flashjax.engine import kernels, schedule


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("--dram-budget", default="50%")
    p.add_argument("--tokens", type=int, default=40)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--trace", help="activity trace (synthetic stores): predictor 'trace'")
    args = p.parse_args()

    times = collections.defaultdict(list)
    plans = []  # (cache, capacity, n_neurons, needed, step, window, scores), in order

    def timed(fn, name):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            times[name].append(time.perf_counter() - t0)
            return out
        return wrapper

    plan = cache.NeuronCache.plan

    def recorded_plan(self, needed, step, window, scores=None):
        plans.append((id(self), self.capacity, self.slot_of.size, np.array(needed), step, window,
                      scores))
        return plan(self, needed, step, window, scores)

    options = {"predictor": "trace", "trace": args.trace} if args.trace else {}
    model = flashjax.load(args.model_dir, dram_budget=args.dram_budget, window=args.window,
                          **load_options(args.model_dir, options))
    prompt = [2] + list(range(10, 17))
    model.generate(prompt[:2], 2, stop_at_eos=False)  # compile first
    cache.NeuronCache.plan = timed(recorded_plan, "plan, in generation")
    schedule.update_buffer = timed(kernels.update_buffer, "update dispatch")
    schedule.LayerWork.pack = timed(schedule.LayerWork.pack, "int32 argument")
    _, stats = model.generate(prompt, args.tokens, stop_at_eos=False, return_stats=True)
    cache.NeuronCache.plan = plan

    caches = {}  # one fresh cache per layer's cache
    for layer, capacity, n, needed, step, window, scores in plans:  # back to back
        c = caches.setdefault(layer, cache.NeuronCache(n, capacity))
        t0 = time.perf_counter()
        c.plan(needed, step, window, scores)
        times["plan, replayed in a loop"].append(time.perf_counter() - t0)

    n_tokens = stats["tokens"]
    print(f"{args.model_dir}: {n_tokens} tokens, budget {args.dram_budget}, window "
          f"{args.window}; memory phase {np.median(stats['per_token']['memory_s']) * 1e3:.2f}"
          f" ms per token (median)")
    print(f"{'':28}{'median us':>10}{'calls/token':>13}")
    for name, values in times.items():
        print(f"{name:28}{np.median(values) * 1e6:>10.1f}{len(values) / n_tokens:>13.1f}")


if __name__ == "__main__":
    main()
