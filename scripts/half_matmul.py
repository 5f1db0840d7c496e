"""Half-precision matmuls on XLA:CPU at LM-head and projection shapes (batch 1, one token):
float32 weights, float16 weights contracted as float16, widened whole to float32, and widened
a slice of vocabulary rows at a time (as ``flashjax.model.layers._widened_head`` does).

    python scripts/half_matmul.py [--vocab 50272] [--width 2048] [--reps 5]

Prints milliseconds per call (median of --reps) and the compiled call's temporary memory.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from flashjax.model.layers import _widened_head


def timed(fn, *args, reps):
    fn(*args).block_until_ready()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=50272)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    w32 = jnp.asarray(rng.standard_normal((args.vocab, args.width), np.float32) * 0.02)
    w16 = w32.astype(jnp.float16)
    h = jnp.asarray(rng.standard_normal((1, 1, args.width), np.float32))
    cases = {
        "float32 weights": (lambda h, w: jnp.einsum("bsd,vd->bsv", h, w), w32),
        "float16 contraction": (lambda h, w: jnp.einsum("bsd,vd->bsv", h.astype(w.dtype), w)
                                .astype(jnp.float32), w16),
        "float16 widened whole": (lambda h, w: jnp.einsum("bsd,vd->bsv", h,
                                                          w.astype(jnp.float32)), w16),
        "float16 widened by slices": (lambda h, w: _widened_head(h, w, 0), w16),
    }
    proj32, proj16 = w32[:args.width], w16[:args.width]
    cases.update({
        f"projection {args.width}x{args.width} float32": (lambda h, w: h @ w, proj32),
        f"projection {args.width}x{args.width} widened": (
            lambda h, w: h @ w.astype(jnp.float32), proj16),
        f"projection {args.width}x{args.width} float16": (
            lambda h, w: (h.astype(w.dtype) @ w).astype(jnp.float32), proj16),
    })
    for name, (fn, w) in cases.items():
        jitted = jax.jit(fn)
        temp = jitted.lower(h, w).compile().memory_analysis().temp_size_in_bytes
        print(f"{name:<36}{timed(jitted, h, w, reps=args.reps):>9.2f} ms  temp {temp / 2**20:.0f} MB")


if __name__ == "__main__":
    main()
