"""Would co-activation bundling help? The paper's experiment, on a model's own activations.

    python scripts/coactivation.py ACTIVATIONS_DIR [--window 4] [--json FILE]

ACTIVATIONS_DIR is what ``flashjax collect`` wrote (true per-token activity per layer). For
each layer, every neuron's partner is the neuron it fires together with most often on the
first 80% of the tokens. On the last 20%, with a window-k cache that has room for everything,
two layouts are simulated token by token:

* row-column bundles (what flashjax stores): each needed neuron that is not resident is one
  read of one bundle;
* co-activation bundles: neuron i is stored with its partner, so reading i also brings the
  partner in; a needed neuron already brought in this way costs no read.

Printed per layer: reads and bytes per token of both, the fraction of partner rows that the
token actually needed and did not have (useful), and how concentrated the partners are (the
share of neurons whose partner is one of the 1% most active neurons).
"""

import argparse
import json
from pathlib import Path

import numpy as np

from flashjax.predictor.collect import open_arrays, read_meta


def partners(active: np.ndarray) -> np.ndarray:
    """Per neuron, the other neuron it is most often active with: active [T, N] bool -> [N]."""
    a = active.astype(np.float32)
    co = a.T @ a
    np.fill_diagonal(co, -1)
    return co.argmax(axis=1)


def simulate(active: np.ndarray, partner: np.ndarray | None, window: int) -> dict:
    """Reads and rows read per token with a window-``window`` cache of unlimited room."""
    t, n = active.shape
    last = np.full(n, -10 ** 9)
    reads = rows = useful = 0
    for step in range(t):
        needed = np.flatnonzero(active[step])
        missing = needed[last[needed] < step - window + 1]
        if partner is None:
            reads += missing.size
            rows += missing.size
        else:
            brought = np.zeros(n, bool)
            for i in missing:
                if brought[i]:
                    continue
                reads += 1
                rows += 2
                brought[i] = True
                j = partner[i]
                if not brought[j]:
                    brought[j] = True
                    useful += bool(active[step, j] and last[j] < step - window + 1)
        last[needed] = step
    out = {"reads_per_token": reads / t, "rows_per_token": rows / t}
    if partner is not None:
        out["useful_partner_fraction"] = useful / max(reads, 1)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dir")
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--tokens", type=int, default=20000, help="tokens used (from the start)")
    p.add_argument("--json")
    args = p.parse_args()
    meta = read_meta(args.data_dir)
    n = meta["n_neurons"]
    tokens = min(args.tokens, meta["tokens_written"])
    split = int(0.8 * tokens)
    report = {"data": args.data_dir, "window": args.window, "tokens": tokens, "layers": []}
    print(f"{'layer':>5} {'reads/token':>12} {'co-bundled':>11} {'rows/token':>11} "
          f"{'co-bundled':>11} {'useful partner':>15} {'hub share':>10}")
    for layer in range(meta["n_layers"]):
        _, bits = open_arrays(Path(args.data_dir), layer)
        packed = bits[:tokens].read().result()
        active = np.unpackbits(packed, axis=-1, count=n, bitorder="little").astype(bool)
        partner = partners(active[:split])
        hot = np.argsort(-active[:split].mean(axis=0))[:max(1, n // 100)]
        hub_share = float(np.isin(partner, hot).mean())
        base = simulate(active[split:], None, args.window)
        co = simulate(active[split:], partner, args.window)
        report["layers"].append({"layer": layer, "row_column": base, "co_activation": co,
                                 "partner_in_top_1pct": hub_share})
        print(f"{layer:>5} {base['reads_per_token']:>12.1f} {co['reads_per_token']:>11.1f} "
              f"{base['rows_per_token']:>11.1f} {co['rows_per_token']:>11.1f} "
              f"{co['useful_partner_fraction']:>15.1%} {hub_share:>10.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
