"""Counters and per-token timings of one generation, each phase timed in one place."""

from __future__ import annotations

import time

import jax
import numpy as np

from flashjax.engine.transfer import KINDS
from flashjax.store.reader import storage_read_bytes

PHASES = ("io", "memory", "predictor", "compute")


class Stats:
    """Per token: host seconds in each phase; in all: rows needed, loaded into buffers,
    streamed past them, evicted. ``rows_dropped`` is always 0: rows that do not fit are
    streamed, never skipped (it stays in the report for readers of older results)."""

    def __init__(self):
        self.tokens = 0
        self.rows_loaded = self.rows_streamed = self.rows_evicted = self.rows_needed = 0
        self.per_token: dict[str, list[float]] = {p: [] for p in PHASES}
        self.rows_read_per_token: list[int] = []
        self.rows_per_read: list[int] = []  # rows of each reader call (its concurrency)
        # storage requests (and their bytes) per token: adjacent rows read as one request count
        # once, so requests <= rows
        self.requests_per_token: list[int] = []
        self.request_bytes_per_token: list[int] = []
        self._requests_now = self._request_bytes_now = 0
        # host -> device bytes per token by kind (``engine.transfer.KINDS``), device -> host
        self.to_device_per_token: dict[str, list[int]] = {k: [] for k in KINDS}
        self.to_host_per_token: list[int] = []
        self._to_device_now = dict.fromkeys(KINDS, 0)
        self._to_host_now = 0
        self._storage0 = storage_read_bytes()
        self._current = dict.fromkeys(PHASES, 0.0)
        self._read_now = 0

    def phase(self, name: str) -> _Phase:
        """``with stats.phase(name):`` times the block as phase ``name`` (host seconds) and
        marks it for the profiler."""
        return _Phase(self._current, name)

    def read(self, rows: int, *, streamed: bool, requests: int = 0,
             request_bytes: int = 0) -> None:
        """``rows`` came from flash in one reader call, in ``requests`` storage requests of
        ``request_bytes`` in all."""
        self._requests_now += requests
        self._request_bytes_now += request_bytes
        if streamed:
            self.rows_streamed += rows
        else:
            self.rows_loaded += rows
        self._read_now += rows
        self.rows_per_read.append(rows)

    def to_device(self, kind: str, nbytes: int) -> None:
        """``nbytes`` handed to the device as ``kind`` (rows, plan, inputs)."""
        self._to_device_now[kind] += nbytes

    def to_host(self, nbytes: int) -> None:
        self._to_host_now += nbytes

    def end_token(self) -> None:
        for p in PHASES:
            self.per_token[p].append(self._current[p])
        self.rows_read_per_token.append(self._read_now)
        self.requests_per_token.append(self._requests_now)
        self.request_bytes_per_token.append(self._request_bytes_now)
        self._current = dict.fromkeys(PHASES, 0.0)
        for k in KINDS:
            self.to_device_per_token[k].append(self._to_device_now[k])
        self.to_host_per_token.append(self._to_host_now)
        self._to_device_now = dict.fromkeys(KINDS, 0)
        self._read_now = self._requests_now = self._request_bytes_now = self._to_host_now = 0
        self.tokens += 1

    def report(self, row_bytes: int) -> dict:
        storage = storage_read_bytes()
        totals = [sum(v) for v in zip(*self.per_token.values())]
        return {
            "flash_bytes_read": (self.rows_loaded + self.rows_streamed) * row_bytes,
            "storage_bytes_read": None if storage is None or self._storage0 is None
            else storage - self._storage0,
            "rows_loaded": self.rows_loaded,
            "rows_streamed": self.rows_streamed,
            "rows_evicted": self.rows_evicted,
            "rows_dropped": 0,
            "rows_needed": self.rows_needed,
            "tokens": self.tokens,
            "rows_read_per_token": self.rows_read_per_token,
            "rows_per_read": self.rows_per_read,
            "requests_per_token": self.requests_per_token,
            "request_bytes_per_token": self.request_bytes_per_token,
            "mean_request_bytes": (sum(self.request_bytes_per_token)
                                   / max(sum(self.requests_per_token), 1)),
            "host_to_device_bytes_per_token": dict(self.to_device_per_token),
            "device_to_host_bytes_per_token": self.to_host_per_token,
            "per_token": {**{f"{p}_s": self.per_token[p] for p in PHASES}, "total_s": totals},
            **{f"median_{p}_s": float(np.median(self.per_token[p])) if self.tokens else 0.0
               for p in PHASES},
            "median_total_s": float(np.median(totals)) if totals else 0.0,
        }


class _Phase:
    """A timed block (a class, not a generator: it runs dozens of times per token)."""

    __slots__ = ("totals", "name", "t0", "annotation")

    def __init__(self, totals: dict, name: str):
        self.totals, self.name = totals, name

    def __enter__(self):
        self.annotation = jax.profiler.TraceAnnotation(self.name)
        self.annotation.__enter__()
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.totals[self.name] += time.perf_counter() - self.t0
        self.annotation.__exit__(*exc)
