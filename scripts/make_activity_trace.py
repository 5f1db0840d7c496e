"""Record an activity trace from a trained model and map it onto a larger store's shape.

    python scripts/make_activity_trace.py SOURCE_MODEL --text data/corpus/heldout.txt \
        --for TARGET_MODEL --out data/traces/opt-6.7b.npz [--tokens 256] [--source predictor]

SOURCE_MODEL is a converted model with trained predictors (e.g. the shipped model's cache
directory); TARGET_MODEL a converted store of any shape (e.g. a synthetic OPT-6.7B). The trace
is the set of neurons the source's predictors select (or, with ``--source true``, the neurons
that fire) for each of ``--tokens`` consecutive held-out tokens, stretched onto the target's
layers and neurons as described in ``flashjax.bench.activity``. Prints, and stores in
``OUT.json``, per layer the active fraction, the overlap with the previous token and the new
rows per token for several windows, for the source and for the mapped trace.
"""

import argparse
import json
from pathlib import Path

import numpy as np

from flashjax.bench.activity import map_onto, record, statistics
from flashjax.store.manifest import Manifest


def summary(stats: dict) -> dict:
    return {"active_fraction_mean": float(np.mean(stats["active_fraction"])),
            "overlap_prev_mean": float(np.mean(stats["overlap_prev"])),
            "new_fraction_mean": {k: float(np.mean(v)) for k, v in stats["new_fraction"].items()}}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source_model")
    p.add_argument("--text", required=True)
    p.add_argument("--for", dest="target", required=True, help="the converted target store")
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--source", choices=("predictor", "true"), default="predictor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layer-map", choices=("first-apart", "proportional"), default="first-apart",
                   help="how source layers spread over the target's (flashjax.bench.activity)")
    args = p.parse_args()

    cfg = Manifest.read(args.target).config
    trace = record(args.source_model, args.text, tokens=args.tokens, source=args.source)
    mapped = map_onto(trace, cfg.num_hidden_layers, cfg.ffn_dim, seed=args.seed,
                      how=args.layer_map)
    mapped.meta["target"] = str(args.target)
    out = mapped.save(args.out)
    report = {"source": statistics(trace.active), "mapped": statistics(mapped.active),
              "meta": mapped.meta}
    report["source_summary"] = summary(report["source"])
    report["mapped_summary"] = summary(report["mapped"])
    Path(str(out) + ".json").write_text(json.dumps(report, indent=1))
    src = report["source"]
    print(f"source {trace.shape} -> mapped {mapped.shape}: {out}")
    print("layer  active  overlap  new/token (k=1, 4, 8)")
    for i in range(trace.shape[1]):
        nf = src["new_fraction"]
        print(f"{i:5d}  {src['active_fraction'][i]:6.3f}  {src['overlap_prev'][i]:7.3f}  "
              f"{nf['1'][i]:.4f} {nf['4'][i]:.4f} {nf['8'][i]:.4f}")
    print("source summary", json.dumps(report["source_summary"]))
    print("mapped summary", json.dumps(report["mapped_summary"]))


if __name__ == "__main__":
    main()
