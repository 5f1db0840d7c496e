"""How much a neuron order on flash could shorten a token's reads, estimated offline from the
activity that ``flashjax collect`` recorded.

    python scripts/placement_estimate.py ACTS_DIR --row-bytes 1024 [--fit 0.75]

Per layer, orders fitted on the first ``--fit`` of the tokens and scored on the rest: the
store's order (identity), neurons by firing frequency, and a greedy path through the
co-activation graph (start at the most frequent neuron, then always the unplaced neuron that
fires most often together with the last one placed). The score per token: the 4 KiB blocks
that hold its active rows (what direct reads of rows below a block cost), and the runs of
adjacent active rows (requests, if each run is one read). Every active row counts, not only
the window's new ones, so this bounds what placement changes rather than measuring it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from flashjax.predictor.collect import open_arrays, read_meta


def greedy_path(co: np.ndarray, freq: np.ndarray) -> np.ndarray:
    n = len(freq)
    order = [int(np.argmax(freq))]
    placed = np.zeros(n, bool)
    placed[order[0]] = True
    for _ in range(n - 1):
        row = np.where(placed, -1, co[order[-1]])
        nxt = int(np.argmax(row)) if row.max() > 0 else int(np.argmax(np.where(placed, -1, freq)))
        order.append(nxt)
        placed[nxt] = True
    return np.array(order)


def score(active: np.ndarray, order: np.ndarray, per_block: int) -> tuple[float, float]:
    """Mean blocks and runs per token of ``active`` [T, N] with neuron ``order[i]`` at row i."""
    pos = np.empty(len(order), np.int64)
    pos[order] = np.arange(len(order))
    blocks, runs = [], []
    for t in active:
        p = np.sort(pos[np.flatnonzero(t)])
        blocks.append(len(np.unique(p // per_block)))
        runs.append(1 + int((np.diff(p) > 1).sum()) if p.size else 0)
    return float(np.mean(blocks)), float(np.mean(runs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("--row-bytes", type=int, required=True)
    ap.add_argument("--fit", type=float, default=0.75)
    args = ap.parse_args()
    data = Path(args.data)
    meta = read_meta(data)
    n, tokens = meta["n_neurons"], meta["tokens_written"]
    per_block = max(1, 4096 // args.row_bytes)
    split = int(args.fit * tokens)
    print(f"{'layer':>5} {'active':>7} | blocks per token: {'store':>6} {'freq':>6} {'greedy':>6}"
          f" | runs per token: {'store':>6} {'freq':>6} {'greedy':>6}")
    for layer in range(meta["n_layers"]):
        _, act = open_arrays(data, layer)
        bits = np.unpackbits(act[:tokens].read().result(), axis=-1, count=n,
                             bitorder="little").astype(bool)
        fit, test = bits[:split], bits[split:]
        a = fit.astype(np.float32)
        co = a.T @ a
        freq = np.diag(co).copy()
        np.fill_diagonal(co, 0)
        orders = [np.arange(n), np.argsort(-freq, kind="stable"), greedy_path(co, freq)]
        scores = [score(test, o, per_block) for o in orders]
        print(f"{layer:>5} {test.sum(1).mean():>7.1f} | {'':>17}"
              + "".join(f"{s[0]:>7.1f}" for s in scores) + f" | {'':>15}"
              + "".join(f"{s[1]:>7.1f}" for s in scores))


if __name__ == "__main__":
    main()
