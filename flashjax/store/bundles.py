"""The flash store: one TensorStore zarr3 array per layer, ``[n_neurons, parts * d_model]``.

Row i is neuron i's bundle: OPT's up-projection column (fc1 weight row i) followed by its
down-projection row (fc2 weight column i); a gated FFN's gate row, up row and down column.
One shard holds a whole layer and the inner chunk is one row, uncompressed, so every neuron
is one contiguous, aligned byte range of the shard file (row i at offset ``i * row_bytes``,
the shard index with its crc32c at the end). Row data carry a checksum per row (crc32c; crc32
in older stores) in ``ffn/crc32.npy``, kept beside the arrays rather than as a per-chunk codec
so that rows stay block-aligned for direct I/O.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import google_crc32c
import numpy as np
import tensorstore as ts

FFN_DIR = "ffn"
SPLIT_DIR = "ffn_split"  # the same weights unbundled (up and down apart), for benchmarks
CHECKSUM_FILE = "crc32.npy"


class StoreError(RuntimeError):
    """The flash store is missing, truncated or corrupt."""


def layer_key(layer: int) -> str:
    return f"layer_{layer:03d}"


def array_spec(model_dir: Path, layer: int, array: str | None = None) -> dict:
    """A layer's bundle array, or with ``array`` another array of the model dir."""
    path = Path(model_dir) / (array or f"{FFN_DIR}/{layer_key(layer)}")
    return {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}


SPLIT_NAMES = {2: ("up", "down"), 3: ("gate", "up", "down")}


def split_arrays(layer: int, n_parts: int = 2) -> tuple[str, ...]:
    """Relative paths of a layer's unbundled part arrays (up and down; gated: gate, up, down)."""
    return tuple(f"{SPLIT_DIR}/{name}_{layer:03d}" for name in SPLIT_NAMES[n_parts])


def write_context() -> ts.Context:
    # The converter writes each shard once; fsync on every write only slows it down. The
    # final directory rename is what makes the conversion visible.
    return ts.Context({"file_io_sync": False})


def create_layer(model_dir: Path, layer: int, bundles: np.ndarray, context: ts.Context,
                 array: str | None = None) -> None:
    """Write one layer's bundle matrix [n_neurons, bundle_width] as a single shard, one row
    per inner chunk (or, with ``array``, any row matrix in that layout)."""
    n, width = bundles.shape
    store = ts.open(
        array_spec(model_dir, layer, array), create=True, context=context,
        dtype=ts.dtype(bundles.dtype.name), shape=[n, width],
        chunk_layout=ts.ChunkLayout(read_chunk_shape=[1, width], write_chunk_shape=[n, width]),
    ).result()
    store.write(bundles).result()


# Row checksum functions by manifest name. crc32c runs on the CPU's crc32 instruction
# (google-crc32c): ~0.1 us per KiB, a quarter of zlib's crc32, which older stores carry.
ROW_CHECKSUMS = {"crc32c": google_crc32c.value, "crc32": zlib.crc32}


class Checksums(np.ndarray):
    """uint32 row checksums that know their function (``kind``, a ``ROW_CHECKSUMS`` key);
    indexing keeps it."""

    kind: str = "crc32"

    def __array_finalize__(self, obj):
        self.kind = getattr(obj, "kind", "crc32")


def as_checksums(values: np.ndarray, kind: str) -> Checksums:
    out = np.asarray(values, np.uint32).view(Checksums)
    out.kind = kind
    return out


def row_checksums(rows: np.ndarray, kind: str = "crc32c") -> Checksums:
    """The checksum of each row's bytes: [n] uint32."""
    fn = ROW_CHECKSUMS[kind]
    rows = np.ascontiguousarray(rows)
    return as_checksums(np.fromiter((fn(r) for r in rows.view(np.uint8)), np.uint32, len(rows)),
                        kind)


def open_layer(model_dir: Path, layer: int, context: ts.Context | None = None) -> ts.TensorStore:
    try:
        return ts.open(array_spec(model_dir, layer), open=True, read=True,
                       context=context or ts.Context()).result()
    except Exception as e:  # TensorStore raises ValueError/RuntimeError subclasses
        raise StoreError(f"{Path(model_dir) / FFN_DIR / layer_key(layer)}: cannot open the "
                         f"bundle array ({e}); run `flashjax verify {model_dir}`") from None


def read_rows(store: ts.TensorStore, rows, *, where: str) -> np.ndarray:
    """Read bundle rows (an index array or slice) with a clear error on failure."""
    try:
        return store[rows].read().result()
    except Exception as e:
        raise StoreError(f"{where}: reading bundle rows failed ({e}); the shard file may be "
                         f"truncated or corrupt") from None


def load_checksums(model_dir: Path, shape: tuple[int, int] | None = None) -> Checksums:
    """The rows' checksums, uint32 [layers, neurons]: ``shape``, by default the manifest's;
    their function is the manifest's ``layout.ffn.row_checksum``."""
    from flashjax.store.manifest import Manifest

    path = Path(model_dir) / FFN_DIR / CHECKSUM_FILE
    manifest = Manifest.read(model_dir, check_files=False)
    if shape is None:
        cfg = manifest.config
        shape = (cfg.num_hidden_layers, cfg.ffn_dim)
    wanted = (f"expected the rows' crc32s, a uint32 array of shape {tuple(shape)} "
              f"([layers, neurons] of the manifest)")
    checksums = load_array(path, np.uint32, shape, "checksum file", wanted)
    return as_checksums(checksums, manifest.row_checksum)


def load_array(path: Path, dtype, shape, what: str, wanted: str) -> np.ndarray:
    """The one array of .npy file ``path``, of ``dtype`` and ``shape``: else a StoreError
    naming the file, what is wrong with it, and ``wanted`` (what it should hold); ``what``
    names the file when it is missing."""
    if path.is_dir():
        raise StoreError(f"{path}: is a directory; {wanted}")
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise StoreError(f"{path}: missing {what}; {wanted}") from None
    except Exception as e:  # not .npy, truncated, pickled objects, a broken zip...
        raise StoreError(f"{path}: not a valid .npy file ({type(e).__name__}: {e}); "
                         f"{wanted}") from None
    if not isinstance(array, np.ndarray):  # a .npz archive
        array.close()
        raise StoreError(f"{path}: holds a {type(array).__name__}, not one array; {wanted}")
    if array.dtype != dtype or array.shape != tuple(shape):
        raise StoreError(f"{path}: {array.dtype} array of shape {array.shape}; {wanted}")
    return array


def check_rows(rows: np.ndarray, ids: np.ndarray, expected: Checksums, *, where: str) -> None:
    """Compare rows' checksums with the stored ones (``expected``: a layer's, from
    ``load_checksums``); name the first bad neurons."""
    kind = getattr(expected, "kind", "crc32")
    bad = np.flatnonzero(row_checksums(rows, kind) != np.asarray(expected)[ids])
    if bad.size:
        shown = ", ".join(str(int(i)) for i in np.asarray(ids)[bad[:8]])
        raise StoreError(f"{where}: {kind} mismatch in {bad.size} row(s) (neurons {shown}"
                         f"{', ...' if bad.size > 8 else ''}); the flash store is corrupt, "
                         f"reconvert the model")


def write_split(model_dir: Path, out_dir: Path | None = None, progress: bool = False) -> Path:
    """Write the FFN a second time unbundled, each part's rows (up-projection columns,
    down-projection rows, ...) in its own array (one row per chunk, one shard per layer),
    under ``out_dir`` (default: the model dir) unless already there: the layout that
    row-column bundling is measured against. Returns ``out_dir``."""
    from tqdm.auto import tqdm

    from flashjax.store.manifest import Manifest

    model_dir = Path(model_dir)
    out_dir = model_dir if out_dir is None else Path(out_dir)
    if (out_dir / SPLIT_DIR / "complete").exists():
        return out_dir
    manifest = Manifest.read(model_dir)
    if manifest.quant is not None:
        raise StoreError(f"{model_dir}: the unbundled copy is written for float stores only; "
                         f"this one holds {manifest.ffn_dtype} rows")
    cfg = manifest.config
    n_parts = len(cfg.ffn_parts)
    context = write_context()
    for layer in tqdm(range(cfg.num_hidden_layers), desc="unbundled copy", unit="layer",
                      disable=not progress):
        rows = read_layer(model_dir, layer)
        d = rows.shape[1] // n_parts
        for i, array in enumerate(split_arrays(layer, n_parts)):
            create_layer(out_dir, layer, np.ascontiguousarray(rows[:, i * d:(i + 1) * d]),
                         context, array)
    (out_dir / SPLIT_DIR / "complete").touch()
    return out_dir


def load_scales(model_dir: Path, manifest) -> np.ndarray | None:
    """The resident row scales [layers, neurons, groups] float16 of a quantized store with
    scales="dram" (checked against the manifest's crc32), else None."""
    from flashjax.store.manifest import tensor_checksum
    from flashjax.store.quant import SCALES_FILE

    q = manifest.quant
    if q is None or q.scales != "dram":
        return None
    cfg = manifest.config
    path = Path(model_dir) / FFN_DIR / SCALES_FILE
    shape = (cfg.num_hidden_layers, cfg.ffn_dim, q.groups)
    wanted = f"expected the rows' float16 scales of shape {shape} ([layers, neurons, groups])"
    scales = load_array(path, np.float16, shape, "scales file", wanted)
    if tensor_checksum(scales) != manifest.scales_checksum:
        raise StoreError(f"{path}: crc32 {tensor_checksum(scales)} differs from the manifest's "
                         f"{manifest.scales_checksum}; the scales are corrupt, reconvert the "
                         f"model")
    return scales


def read_layer_values(model_dir: Path, layer: int, manifest, checksums: np.ndarray | None,
                      scales: np.ndarray | None = None) -> np.ndarray:
    """All bundles of one layer as values [n_neurons, bundle_width]: the stored rows, or for
    a quantized store the rows decoded to float32 (``scales``: ``load_scales``'s)."""
    from flashjax.store import quant

    rows = read_layer(model_dir, layer, checksums)
    if manifest.quant is None:
        return rows
    return quant.decode(rows, manifest.quant, None if scales is None else scales[layer])


def read_layer(model_dir: Path, layer: int, checksums: np.ndarray | None = None,
               context: ts.Context | None = None) -> np.ndarray:
    """All bundles of one layer, checked against the stored crc32 when given."""
    where = str(Path(model_dir) / FFN_DIR / layer_key(layer))
    store = open_layer(model_dir, layer, context)
    rows = read_rows(store, slice(None), where=where)
    if checksums is not None:
        check_rows(rows, np.arange(rows.shape[0]), checksums[layer], where=where)
    return rows
