"""Quantized bundle rows: int8 or int4 values with group-wise float16 scales.

A row of ``width`` values (one neuron's bundle) is quantized symmetrically in groups of
``group`` consecutive values (a group never spans two FFN parts: ``group`` divides the model
width; for int4 also half the row): value = q x scale, q in [-127, 127] (int8) or [-8, 7]
(int4), one float16 scale per group. On flash a row is its values (int8 one per byte; int4 two
per byte, byte j holding value j in its low nibble and value j + width/2 in its high one, each
stored as q + 8, so that each half decodes without interleaving: on XLA:CPU neighbours paired
in a byte decoded ~2x slower, docs/BENCHMARKS.md) followed, with ``scales="row"``, by its
scales; rows are padded to ``ROW_ALIGN`` bytes. With ``scales="dram"`` the scales live in
``ffn/scales.npy`` [layers, neurons, groups] and stay resident, like the FFN biases: rows whose
values fill whole 4 KiB blocks (OPT-6.7B: 8 KiB at int8, 4 KiB at int4) would otherwise take
one more block per read for a few hundred bytes of scales.

``Quant`` is the layout: frozen and hashable, the jitted kernels specialise on it. Quantizing
is numpy (``encode``), dequantizing is numpy (``decode``) or jax (``decode_jax``, inside the
update kernels).

Two ways to choose the scales: ``rtn`` (round to nearest: scale = the group's largest
magnitude / qmax) and ``mse``, which needs no training: per group the clipping ratio (of a
grid) that minimises the squared error of what the rows compute, for the input parts weighted
by the mean square of each input feature on calibration text (the error of a pre-activation
is sum_j dw_j x_j), for the down part unweighted (the error of the output is a dw).
"""

from __future__ import annotations

import dataclasses

import numpy as np

FFN_DTYPES = ("int8", "int4")
DEFAULT_GROUP = {"int8": 128, "int4": 64}
QMAX = {8: 127, 4: 7}
ROW_ALIGN = 16  # bytes: row pitch of a quantized store
BLOCK = 4096
SCALES_FILE = "scales.npy"
SCALE_PLACES = ("row", "dram")
METHODS = ("rtn", "mse")
CLIP_GRID = tuple(np.round(np.linspace(1.0, 0.5, 11), 3).tolist())


class QuantError(ValueError):
    """A quantization layout that cannot hold this model's rows."""


@dataclasses.dataclass(frozen=True)
class Quant:
    """The layout of a quantized row. bits: 8 or 4; group: values per scale; width: values
    per row (``ModelConfig.bundle_width``); scales: "row" (stored after the values) or "dram"
    (``ffn/scales.npy``, resident); method: how the scales were chosen (informational)."""

    bits: int
    group: int
    width: int
    scales: str = "row"
    method: str = "rtn"

    def __post_init__(self):
        if self.bits not in QMAX:
            raise QuantError(f"quantized rows take 8 or 4 bits, not {self.bits}")
        if self.scales not in SCALE_PLACES:
            raise QuantError(f"scales go in one of {SCALE_PLACES}, not {self.scales!r}")
        if self.method not in METHODS:
            raise QuantError(f"quantization method {self.method!r} is not one of {METHODS}")
        if self.group <= 0 or self.group % 2 or self.width % self.group:
            raise QuantError(f"group size {self.group} must be even and divide the row width "
                             f"{self.width}")
        if self.bits == 4 and (self.width // 2) % self.group:
            raise QuantError(f"int4 group size {self.group} must divide half the row width "
                             f"({self.width // 2}): each half of a row decodes on its own")

    @classmethod
    def for_model(cls, ffn_dtype: str, cfg, *, group: int | None = None,
                  scales: str | None = None, method: str = "rtn") -> Quant:
        """The layout for ``cfg``'s rows at ``ffn_dtype`` ("int8", "int4"). ``group``:
        default 128 (int8) or 64 (int4), at most the model width, which it must divide;
        ``scales``: default "dram" when the values alone fill whole 4 KiB blocks, else "row"."""
        if ffn_dtype not in FFN_DTYPES:
            raise QuantError(f"ffn dtype {ffn_dtype!r} is not one of {FFN_DTYPES}")
        d = cfg.hidden_size
        if group is None:
            group = min(DEFAULT_GROUP[ffn_dtype], d)
            while ffn_dtype == "int4" and (cfg.bundle_width // 2) % group and group > 2:
                group //= 2  # (a gated FFN's half row is 1.5 x the width)
        if d % group:
            raise QuantError(f"group size {group} does not divide the model width {d} (hidden_size"
                             f"): a group would span two FFN parts")
        bits = 8 if ffn_dtype == "int8" else 4
        values = cfg.bundle_width * bits // 8
        if scales is None:
            scales = "dram" if values % BLOCK == 0 else "row"
        return cls(bits=bits, group=group, width=cfg.bundle_width, scales=scales, method=method)

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    @property
    def qmax(self) -> int:
        return QMAX[self.bits]

    @property
    def groups(self) -> int:
        return self.width // self.group

    @property
    def value_bytes(self) -> int:
        return self.width * self.bits // 8

    @property
    def row_bytes(self) -> int:
        raw = self.value_bytes + (2 * self.groups if self.scales == "row" else 0)
        return -(-raw // ROW_ALIGN) * ROW_ALIGN

    @property
    def scale_bytes_per_row(self) -> int:
        """Bytes of scales each neuron keeps resident (scales="dram"), else 0."""
        return 2 * self.groups if self.scales == "dram" else 0

    def to_json(self) -> dict:
        return {"bits": self.bits, "group": self.group, "scales": self.scales,
                "scale_dtype": "float16", "method": self.method, "value_bytes": self.value_bytes,
                "row_bytes": self.row_bytes,
                **({"scales_file": f"ffn/{SCALES_FILE}"} if self.scales == "dram" else {})}


# -- choosing scales --------------------------------------------------------------------------

def _quantize_groups(v: np.ndarray, scale: np.ndarray, qmax: int) -> np.ndarray:
    """v [n, g, G] / scale [n, g, 1] rounded to the nearest integer in [-qmax - 1, qmax]
    (int4's -8 only where a clipped scale sends a value there)."""
    low = -qmax - 1 if qmax == 7 else -qmax
    return np.clip(np.rint(v / scale), low, qmax)


def _safe(scale: np.ndarray) -> np.ndarray:
    """float16 scales, never zero (an all-zero group keeps q = 0 with any scale)."""
    scale = scale.astype(np.float16)
    return np.where(scale == 0, np.float16(1), scale)


def choose_scales(values: np.ndarray, q: Quant, weights: np.ndarray | None = None
                  ) -> np.ndarray:
    """float16 scales [n, groups] for rows ``values`` [n, width]. ``q.method`` "rtn": each
    group's largest magnitude / qmax; "mse": per group, the clipping ratio of ``CLIP_GRID``
    whose rounding error sum_j weights_j (v_j - q_j s)^2 is least (``weights`` [width], default
    ones)."""
    n = values.shape[0]
    v = values.astype(np.float32).reshape(n, q.groups, q.group)
    top = np.abs(v).max(axis=-1, keepdims=True)
    if q.method == "rtn":
        return _safe(top / q.qmax)[..., 0]
    w = (np.ones(q.width, np.float32) if weights is None
         else np.asarray(weights, np.float32)).reshape(1, q.groups, q.group)
    best = best_err = None
    for ratio in CLIP_GRID:
        scale = _safe(top * ratio / q.qmax).astype(np.float32)
        err = (w * (v - _quantize_groups(v, scale, q.qmax) * scale) ** 2).sum(-1)
        if best is None:
            best, best_err = scale[..., 0].copy(), err
        else:
            better = err < best_err
            best[better] = scale[..., 0][better]
            best_err = np.minimum(err, best_err)
    return best.astype(np.float16)


def input_weights(cfg, feature_sq: np.ndarray) -> np.ndarray:
    """The ``mse`` weights of a bundle row [width] from the mean square of each FFN input
    feature [D]: those for every input part, ones for the down part."""
    d = cfg.hidden_size
    feature_sq = np.asarray(feature_sq, np.float32).reshape(d)
    parts = len(cfg.ffn_parts)
    return np.concatenate([feature_sq] * (parts - 1) + [np.ones(d, np.float32)])


# -- rows <-> bytes ---------------------------------------------------------------------------

def quantize(values: np.ndarray, q: Quant, scales: np.ndarray) -> np.ndarray:
    """Integer values [n, width] (int8) of rows ``values`` at ``scales`` [n, groups]."""
    n = values.shape[0]
    v = values.astype(np.float32).reshape(n, q.groups, q.group)
    s = scales.astype(np.float32)[..., None]
    return _quantize_groups(v, s, q.qmax).astype(np.int8).reshape(n, q.width)


def pack(ints: np.ndarray, q: Quant, scales: np.ndarray) -> np.ndarray:
    """Integer values [n, width] and scales [n, groups] -> the stored rows [n, row_bytes]
    uint8 (scales included when they go in the row; the padding zero)."""
    n = ints.shape[0]
    out = np.zeros((n, q.row_bytes), np.uint8)
    if q.bits == 8:
        out[:, :q.value_bytes] = ints.view(np.uint8)
    else:
        u = (ints.astype(np.int16) + 8).astype(np.uint8)
        half = q.width // 2
        out[:, :q.value_bytes] = u[:, :half] | (u[:, half:] << 4)
    if q.scales == "row":
        out[:, q.value_bytes:q.value_bytes + 2 * q.groups] = \
            np.ascontiguousarray(scales.astype(np.float16)).view(np.uint8)
    return out


def encode(values: np.ndarray, q: Quant, weights: np.ndarray | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """Rows [n, width] -> (stored rows [n, row_bytes] uint8, scales [n, groups] float16)."""
    scales = choose_scales(values, q, weights)
    return pack(quantize(values, q, scales), q, scales), scales


def unpack(rows: np.ndarray, q: Quant) -> np.ndarray:
    """Stored rows [n, row_bytes] uint8 -> integer values [n, width] int8."""
    data = rows[:, :q.value_bytes]
    if q.bits == 8:
        return np.ascontiguousarray(data).view(np.int8)
    return np.concatenate([(data & 15).astype(np.int8) - 8,
                           (data >> 4).astype(np.int8) - 8], axis=1)


def row_scales(rows: np.ndarray, q: Quant) -> np.ndarray:
    """The scales [n, groups] float16 stored in rows (scales="row")."""
    raw = np.ascontiguousarray(rows[:, q.value_bytes:q.value_bytes + 2 * q.groups])
    return raw.view(np.float16)


def decode(rows: np.ndarray, q: Quant, scales: np.ndarray | None = None,
           dtype=np.float32) -> np.ndarray:
    """Stored rows [n, row_bytes] -> values [n, width] in ``dtype``; ``scales`` [n, groups]
    for scales="dram" (those of the same neurons)."""
    if q.scales == "row":
        scales = row_scales(rows, q)
    elif scales is None:
        raise QuantError("rows of a store with scales='dram' need their scales to decode")
    n = rows.shape[0]
    ints = unpack(rows, q).reshape(n, q.groups, q.group).astype(np.float32)
    return (ints * scales.astype(np.float32)[..., None]).reshape(n, q.width).astype(dtype)


def decode_jax(rows, q: Quant, scales=None, dtype=None):
    """``decode`` inside jit: rows [S, row_bytes] uint8 (scales [S, groups] float16 for
    scales="dram") -> [S, width] in ``dtype`` (default float32)."""
    import jax.numpy as jnp

    return jnp.concatenate(decode_parts_jax(rows, q, 2, scales, dtype), axis=1)


def decode_parts_jax(rows, q: Quant, n_parts: int, scales=None, dtype=None) -> tuple:
    """``decode_jax`` split into the row's ``n_parts`` equal parts, each [S, width / n_parts]
    (int4 rows decode as two halves; where those are the parts, they are never joined)."""
    import jax
    import jax.numpy as jnp

    dtype = dtype or jnp.float32
    s = rows.shape[0]
    data = rows[:, :q.value_bytes]
    if q.scales == "row":
        raw = rows[:, q.value_bytes:q.value_bytes + 2 * q.groups].reshape(s, q.groups, 2)
        scales = jax.lax.bitcast_convert_type(raw, jnp.float16)
    scales = scales.astype(jnp.float32)[..., None]

    def scaled(ints, groups):  # ints [S, n] -> [S, n] floats, ``groups`` [S, n / G, 1]
        n = ints.shape[1]
        return (ints.astype(jnp.float32).reshape(s, n // q.group, q.group) * groups
                ).reshape(s, n)

    if q.bits == 8:
        pieces = [scaled(jax.lax.bitcast_convert_type(data, jnp.int8), scales)]
    else:  # bit operations in int32: on XLA:CPU ~2x faster than on uint8
        d = data.astype(jnp.int32)
        half = q.groups // 2
        pieces = [scaled((d & 15) - 8, scales[:, :half]), scaled((d >> 4) - 8, scales[:, half:])]
    pieces = [p.astype(dtype) for p in pieces]
    part = q.width // n_parts
    if len(pieces) == n_parts:
        return tuple(pieces)
    row = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=1)
    return tuple(row[:, i * part:(i + 1) * part] for i in range(n_parts))
