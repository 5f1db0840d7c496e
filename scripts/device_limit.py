"""Measure the storage's random-read throughput and latency against read size and thread count.

    python scripts/device_limit.py PATH [--seconds S] [--json FILE] [--plot PNG]
                                        [--mark-chunk BYTES] [--file-bytes N] [--allow-page-cache]
                                        [--method best|io_uring|threads]

PATH is a file to read, or a directory in which a scratch file of random bytes is written
(2 GiB by default) and deleted afterwards. Reads bypass the page cache with O_DIRECT; each point
is read from one Python thread per read in flight and from one thread through io_uring, and
keeps the faster (``--method`` picks one). Prints tables of GB/s and median latency per (chunk
size, reads in flight).
"""

import argparse
import json
from pathlib import Path

from flashjax.bench.device import device_limit, format_table, plot_device_limit


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="file to read, or directory for a scratch file")
    parser.add_argument("--seconds", type=float, default=1.0, help="seconds per point")
    parser.add_argument("--json", type=Path, help="write the full result here")
    parser.add_argument("--plot", type=Path, help="write a PNG of the curves here")
    parser.add_argument("--mark-chunk", type=int, help="bytes; mark this chunk size on the plot")
    parser.add_argument("--file-bytes", type=int, help="scratch file size (directories only)")
    parser.add_argument("--allow-page-cache", action="store_true",
                        help="where O_DIRECT is refused, evict the page cache before each point")
    parser.add_argument("--method", choices=("best", "io_uring", "threads"), default="best",
                        help="how reads are kept in flight (default: both, the faster per point)")
    args = parser.parse_args()

    result = device_limit(args.path, seconds=args.seconds, file_bytes=args.file_bytes,
                          allow_page_cache=args.allow_page_cache, method=args.method)
    mode = "O_DIRECT" if result["direct_io"] else "page cache evicted before each point"
    print(f"{result['file']}: {result['filesystem']}, {result['file_note']}, {mode}, "
          f"{result['method']}")
    print(format_table(result))
    print()
    print(format_table(result, field="median_us"))
    if result["storage_ratio_min"] is not None:
        print(f"\nbytes from storage / bytes read: at least {result['storage_ratio_min']:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {plot_device_limit(result, args.plot, mark_chunk=args.mark_chunk)}")


if __name__ == "__main__":
    main()
