"""One benchmark configuration in a process of its own (``flashjax bench`` starts these, inside
a memory cgroup with ``--memory-limit``, and always for the peers).

    python -m flashjax.bench.worker SPEC.json OUT.json

SPEC's ``kind`` is "flashjax" (``model_dir``, ``budget``, ``options``: as a bench
configuration), "dense" (``model_dir``: the reference, every weight in DRAM) or a peer of
``flashjax.bench.peers`` (``hf_dir``, and for accelerate-offload ``max_memory`` and
``offload_dir``); every kind takes ``prompt_ids`` and ``tokens``. OUT gets the configuration's
figures plus the process's own peak RSS (``max_rss_bytes``).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def run(spec: dict) -> dict:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # (transformers' deprecations)
    from flashjax.bench.run import _token_bar

    kind = spec["kind"]
    on_token = _token_bar(spec.get("name", kind), spec["tokens"], spec.get("progress", False))
    if kind == "flashjax":
        from flashjax.bench.run import run_config

        result = run_config(spec["model_dir"], spec["budget"], spec["options"],
                            spec["tokens"], prompt_ids=spec["prompt_ids"],
                            on_token=on_token)
    elif kind == "dense":
        import flashjax

        start = time.perf_counter()
        model = flashjax.load(spec["model_dir"])
        load_s = time.perf_counter() - start
        ids = model.generate(spec["prompt_ids"], spec["tokens"], stop_at_eos=False,
                             on_token=on_token)
        result = {"ids": ids, "tokens": len(ids), "load_s": load_s}
    elif kind == "accelerate-offload":
        from flashjax.bench.peers import accelerate_offload

        result = accelerate_offload(spec["hf_dir"], spec["prompt_ids"], spec["tokens"],
                                    spec["max_memory"], spec["offload_dir"], on_token)
    elif kind == "mmap":
        from flashjax.bench.peers import mmap_weights

        result = mmap_weights(spec["hf_dir"], spec["prompt_ids"], spec["tokens"], on_token)
    else:
        raise ValueError(f"unknown worker kind {kind!r}")
    result["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m flashjax.bench.worker SPEC.json OUT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    result = run(spec)
    Path(argv[1]).write_text(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
