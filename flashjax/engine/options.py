"""How a flash-backed model runs: what jit does not specialise on."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """Options of ``flashjax.load(..., dram_budget=...)`` beyond the budget and predictor.
    None of them changes what is computed, only memory and speed."""

    window: int = 4  # keep neurons needed by the last k tokens (the paper's OPT setting)
    direct_io: bool = True  # O_DIRECT reads: the page cache never serves the flash store
    reader_threads: int = 32  # concurrent reads in flight (the paper used 32)
    max_context: int | None = None  # KV-cache slots reserved (None: min(max positions, 256))
    resident_dtype: str | None = None  # dtype of resident weights in DRAM (None: see load)
    max_batch: int = 1  # sequences per batch reserved in the budget
    verify_reads: bool = True  # crc32-check every row read (cost: docs/BENCHMARKS.md)
    bundled: bool = True  # False: read each part from the unbundled copy (benchmarks)
    unbundled_dir: str | None = None  # where that copy lies (None: in the model directory)
    update_rows: int | None = None  # most rows per read and buffer update (None: from budget)
    overlap: bool = True  # buffer updates and FFN work run while the next rows are read
    io_uring: bool | None = None  # row sets read through io_uring (None: where it can be)
    # io_uring: bytes of unneeded rows one read may span between two needed ones (None: the
    # reader's READ_GAP, 0; reader.GAP_CROSSOVER is where a gap stops paying on the device)
    read_gap: int | None = None
    # host arrays go to the device by an explicit device_put (None: on accelerators; XLA:CPU
    # reads them in place, see engine.transfer)
    explicit_transfers: bool | None = None

    def __post_init__(self):
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        for name in ("reader_threads", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.read_gap is not None and self.read_gap < 0:
            raise ValueError(f"read_gap must be >= 0 bytes, got {self.read_gap}")
        if self.update_rows is not None and self.update_rows < 1:
            raise ValueError(f"update_rows must be >= 1, got {self.update_rows}")


def option_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(EngineOptions))
