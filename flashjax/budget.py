"""DRAM budgets: parsing, and what a flash-backed model holds in DRAM."""

from __future__ import annotations

import dataclasses
import re

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_budget(budget, model_bytes: int) -> int:
    """Bytes from ``budget``: an int byte count, "6GB"/"512MiB", a fraction of ``model_bytes``
    (0.5) or a percentage ("50%")."""
    if isinstance(budget, bool):
        raise ValueError(f"dram_budget {budget!r} is not a size")
    if isinstance(budget, int):
        value = budget
    elif isinstance(budget, float):
        if not 0 < budget <= 1:
            raise ValueError(f"dram_budget {budget!r}: a fraction must be in (0, 1]")
        value = int(budget * model_bytes)
    elif isinstance(budget, str):
        text = budget.strip().upper().replace(" ", "")
        if text.endswith("%"):
            pct = float(text[:-1])
            if not 0 < pct <= 100:
                raise ValueError(f"dram_budget {budget!r}: a percentage must be in (0, 100]")
            value = int(pct / 100 * model_bytes)
        else:
            m = re.fullmatch(r"([0-9]*\.?[0-9]+)([A-Z]*)", text)
            if not m or m.group(2) not in _UNITS:
                raise ValueError(f"dram_budget {budget!r}: expected bytes, '6GB', '512MiB', a "
                                 f"fraction like 0.5 or a percentage like '50%'")
            number = float(m.group(1))
            if m.group(2) == "" and number <= 1 and "." in m.group(1):
                value = int(number * model_bytes)  # "0.5" on the command line: a fraction
            else:
                value = int(number * _UNITS[m.group(2)])
    else:
        raise ValueError(f"dram_budget {budget!r} is not a size")
    if value <= 0:
        raise ValueError(f"dram_budget {budget!r} is not positive")
    return value


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes held in DRAM by a flash-backed model, by part."""

    budget: int
    resident: int  # embeddings, attention, norms, biases, in the compute dtype
    kv_cache: int  # for max_batch x max_context
    predictors: int
    staging: int  # host buffer the reader fills
    workspace: int  # transient copies made while moving and appending rows
    index: int  # per-layer slot <-> neuron maps and last-use steps
    buffers: int  # per-layer neuron buffers at full capacity
    capacities: tuple[int, ...]  # rows of each layer's buffer
    update_rows: int  # most rows read or written in one update (in a layer: at most its capacity)
    slack_rows: int = 0  # rows past each buffer's capacity that padded writes may touch
    staging_slots: int = 1  # staging buffers the reader alternates between (in ``staging``)
    block_slots: int = 0  # io_uring scratch blocks for rows that are not whole blocks (in
    #                       ``workspace``): reads of such rows in flight at once

    @property
    def capacity(self) -> int:
        """The largest layer buffer's rows."""
        return max(self.capacities)

    @property
    def total(self) -> int:
        return (self.resident + self.kv_cache + self.predictors + self.staging + self.workspace
                + self.index + self.buffers)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "capacities": list(self.capacities),
                "total": self.total}


def split_rows(total: int, weights, n_neurons: int, granule: int = 16) -> list[int]:
    """Share ``total`` buffer rows among layers in proportion to ``weights`` (the share of
    neurons each layer is expected to need), none above ``n_neurons``: what a capped layer
    cannot use goes to the others. Rounded down to multiples of ``granule`` below the cap."""
    weights = [max(float(w), 1e-9) for w in weights]
    rows = [0.0] * len(weights)
    free = list(range(len(weights)))
    left = float(total)
    while free and left > 0:
        scale = left / sum(weights[i] for i in free)
        capped = [i for i in free if weights[i] * scale >= n_neurons]
        if not capped:
            for i in free:
                rows[i] = weights[i] * scale
            break
        for i in capped:
            rows[i] = n_neurons
            left -= n_neurons
            free.remove(i)
    return [n_neurons if r >= n_neurons else int(r) // granule * granule for r in rows]
