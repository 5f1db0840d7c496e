"""Where quantized rows are best decoded: on the host (numpy, before the update kernels) or
inside them (``decode_jax``), at OPT-6.7B's row shape.

    python scripts/dequant_cost.py [--width 4096] [--rows 32,128,375,1024] [--reps 30]

Per row count S and layout, the median over --reps of: the host decode of S rows to float32
(numpy ``quant.decode``) followed by the kernels on float32 rows, against the kernels decoding
the staged bytes themselves; each for the two kernels a read feeds (``ffn_staged``, the FFN
over the rows just read, and ``update_buffer``, their insertion into a layer's buffer of
2048 rows). The float16 store's kernels (rows widened inside) are the reference.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from flashjax.engine.kernels import RowUpdate, ffn_staged, update_buffer
from flashjax.engine.state import NeuronBuffer
from flashjax.store import quant


def _median_ms(fn, reps: int) -> float:
    fn()  # compile
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=4096, help="model width D (rows: 2 x D)")
    p.add_argument("--rows", default="32,128,375,1024")
    p.add_argument("--reps", type=int, default=30)
    args = p.parse_args()
    d, n = args.width, 16384
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(1, 1, d)).astype(np.float32))
    bias = jnp.asarray(rng.normal(size=n).astype(np.float32))
    layouts = [quant.Quant(bits=b, group=g, width=2 * d, scales="dram")
               for b, g in ((8, 128), (4, 64))]
    print(f"{'rows':>5} {'layout':>7} {'host decode':>12} {'+ kernels f32':>14} "
          f"{'in-kernel':>10} {'float16 ref':>12}   (ms, median of {args.reps})")
    for s in map(int, args.rows.split(",")):
        values = rng.normal(0, 0.02, (s, 2 * d)).astype(np.float32)
        ids = np.sort(rng.choice(n, s, replace=False))
        packed = RowUpdate.pack(s, ids, no_slot=2048 + s, start=0)
        f16 = values.astype(np.float16)
        buf = [NeuronBuffer.init(2048 + s, d, jnp.float32)]

        def kernels(rows, scales=None, q=None):
            out = ffn_staged(rows, packed, bias, x, None, activation="relu", scales=scales,
                             quant=q)
            buf[0], fence = update_buffer(buf[0], rows, packed, bias, scales, quant=q)
            jax.block_until_ready((out, fence))

        ref = _median_ms(lambda: kernels(f16), args.reps)
        for q in layouts:
            rows, scales = quant.encode(values, q)
            all_scales = np.zeros((n, q.groups), np.float16)
            all_scales[ids] = scales
            device_scales = jnp.asarray(all_scales)
            decode = _median_ms(lambda: quant.decode(rows, q, scales), args.reps)
            decoded = quant.decode(rows, q, scales)
            host = _median_ms(lambda: kernels(decoded), args.reps)
            inside = _median_ms(lambda: kernels(rows, device_scales, q), args.reps)
            print(f"{s:>5} {q.name:>7} {decode:>12.3f} {decode + host:>14.3f} "
                  f"{inside:>10.3f} {ref:>12.3f}", flush=True)


if __name__ == "__main__":
    main()
