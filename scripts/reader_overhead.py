"""Where a row read's time goes: the engine's row-set reads against bare preads.

    python scripts/reader_overhead.py MODEL_DIR [--rows 8,32,128,512,1024] [--reps 30]
                                      [--beside-compute] [--submit-every N]

For each batch size, reads that many random rows of random layers (sorted ids, as the engine
asks for them) 1) with ``FlashReader.read`` through TensorStore (one batched read, O_DIRECT),
2) with ``FlashReader.read`` through io_uring, where the store and system allow it, and 3) with
``os.preadv`` of each row's blocks on a 32-thread pool, straight from the shard file at the
offsets its shard index gives. Both bypass the page cache; the storage bytes each read
(``/proc/self/io``) are printed as a ratio to the rows' bytes, and the CPU time the whole
process spent per read (all threads, ``time.process_time``): on a machine with few cores, a
read whose CPU time approaches its wall time times the cores is bound by the CPU, not the
device. Medians over ``--reps``.

With ``--beside-compute`` each read starts while jitted work runs on the other threads, as in
the engine's overlap: the FFN of one token over a float32 buffer of one layer's rows (all
``ffn_dim`` of them, the model's width), dispatched before the read and waited for after it.
With ``--submit-every N`` the io_uring read hands its requests to the kernel N at a time as it
prepares them (the reader's ``SUBMIT_EVERY``); a very large N submits them all at the first
wait.
"""

import argparse
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from flashjax.store import bundles
from flashjax.store import reader as reader_module
from flashjax.store.manifest import Manifest
from flashjax.store.reader import ALIGN, FlashReader, shard_row_offsets, storage_read_bytes


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("--rows", default="8,32,128,512,1024")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--threads", type=int, default=32)
    p.add_argument("--beside-compute", action="store_true",
                   help="read while an FFN over one layer's rows runs (jax, float32)")
    p.add_argument("--submit-every", type=int, default=None,
                   help="io_uring requests handed to the kernel this many at a time")
    args = p.parse_args()
    if args.submit_every is not None:
        reader_module.SUBMIT_EVERY = args.submit_every
    sizes = [int(x) for x in args.rows.split(",")]
    manifest = Manifest.read(args.model_dir)
    cfg, rb = manifest.config, manifest.row_bytes
    n, layers = cfg.ffn_dim, cfg.num_hidden_layers
    reader = FlashReader(args.model_dir, manifest, max_rows=max(sizes), direct_io=True,
                         concurrency=args.threads, io_uring=False)
    ring = FlashReader(args.model_dir, manifest, max_rows=max(sizes), direct_io=True,
                       concurrency=args.threads)
    dirs = [os.path.join(args.model_dir, bundles.FFN_DIR, bundles.layer_key(i))
            for i in range(layers)]
    offsets = [shard_row_offsets(Path(d), n, rb) for d in dirs]
    fds = [os.open(os.path.join(d, "c", "0", "0"), os.O_RDONLY | os.O_DIRECT) for d in dirs]
    step = -(-rb // ALIGN) * ALIGN + ALIGN
    buf = mmap.mmap(-1, max(sizes) * step)
    view = memoryview(buf)
    pool = ThreadPoolExecutor(args.threads)

    def pread_rows(layer, ids):
        def one(k):
            off = int(offsets[layer][ids[k]])
            lo = off - off % ALIGN
            hi = -(-(off + rb) // ALIGN) * ALIGN
            os.preadv(fds[layer], [view[k * step:k * step + hi - lo]], lo)
        list(pool.map(one, range(len(ids))))

    background = None
    if args.beside_compute:
        import jax
        import jax.numpy as jnp

        held = jnp.ones((n, cfg.hidden_size), jnp.float32)
        x = jnp.ones((1, cfg.hidden_size), jnp.float32)
        ffn = jax.jit(lambda w, x: jnp.maximum(x @ w.T, 0) @ w)
        ffn(held, x).block_until_ready()
        background = lambda: ffn(held, x)  # noqa: E731

    rng = np.random.default_rng(0)
    methods = {"tensorstore": lambda layer, ids: reader.read(layer, ids)}
    if ring.uses_io_uring:
        methods["io_uring"] = lambda layer, ids: ring.read(layer, ids)
    methods["preadv"] = pread_rows
    print(f"{args.model_dir}: rows of {rb} B, {args.threads} reads in flight, O_DIRECT"
          f"{', beside an FFN over one layer' if background else ''}, io_uring requests "
          f"submitted {reader_module.SUBMIT_EVERY} at a time; "
          f"per method: ms, GB/s, storage bytes / row bytes, CPU ms (all threads)")
    print(f"{'rows':>6}" + "".join(f" | {name:>11} {'GB/s':>6} {'stor.x':>6} {'CPU ms':>7}"
                                   for name in methods))
    for size in sizes:
        line = f"{size:>6}"
        for fn in methods.values():
            times, cpu = [], []
            s0 = storage_read_bytes()
            for rep in range(args.reps):
                layer = int(rng.integers(layers))
                ids = np.sort(rng.choice(n, size, replace=False)).astype(np.int32)
                work = background() if background else None
                t0, c0 = time.perf_counter(), time.process_time()
                fn(layer, ids)
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
                if work is not None:
                    work.block_until_ready()
            storage = storage_read_bytes() - s0
            med = float(np.median(times))
            line += (f" | {med * 1e3:>11.2f} {size * rb / med / 1e9:>6.3f} "
                     f"{storage / (args.reps * size * rb):>6.2f} {np.median(cpu) * 1e3:>7.2f}")
        print(line)


if __name__ == "__main__":
    main()
