"""Host-side reader of neuron bundles from the flash store into a preallocated staging buffer.

One batched TensorStore read per layer and token fetches all missing rows concurrently. The
shard indexes stay cached (metadata pool, checked once at open), TensorStore's data cache is
off (the neuron cache is the cache), and by default reads use O_DIRECT so the OS page cache
cannot serve them: what is timed is the storage device.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorstore as ts

from flashjax.store import bundles
from flashjax.store.convert import NP_DTYPES
from flashjax.store.manifest import Manifest


def storage_read_bytes() -> int | None:
    """Bytes this process has caused to be fetched from storage (/proc/self/io), if known."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class FlashReader:
    """Reads bundle rows of any layer into ``staging`` [max_rows, bundle_width]."""

    def __init__(self, model_dir: str | Path, manifest: Manifest, max_rows: int, *,
                 direct_io: bool = True, concurrency: int = 32, verify: bool = False,
                 bundled: bool = True):
        cfg = manifest.config
        self.model_dir = Path(model_dir)
        self.row_bytes = manifest.row_bytes
        self.direct_io = direct_io
        self.verify = verify
        context = {
            "cache_pool": {"total_bytes_limit": 0},
            # shard indexes: 16 B per row and layer, plus metadata
            "cache_pool#meta": {"total_bytes_limit": cfg.num_hidden_layers * cfg.ffn_dim * 16
                                + (16 << 20)},
            "file_io_concurrency": {"limit": concurrency},
        }
        if direct_io:
            context["file_io_mode"] = {"mode": "direct"}
        self.context = ts.Context(context)
        self.bundled = bundled
        self.d_model = cfg.hidden_size
        if bundled:  # one read of 2 x d_model values per neuron
            self.stores = [[self._open(layer)] for layer in range(cfg.num_hidden_layers)]
        else:  # two reads of d_model values per neuron (see bundles.write_split)
            self.stores = [[self._open(layer, a) for a in bundles.split_arrays(layer)]
                           for layer in range(cfg.num_hidden_layers)]
        self.checksums = bundles.load_checksums(model_dir) if verify else None
        self.staging = np.zeros((max_rows, cfg.bundle_width), NP_DTYPES[manifest.dtype])
        self._staging_ts = ts.array(self.staging, copy=False, write=True)

    def _open(self, layer: int, array: str | None = None) -> ts.TensorStore:
        spec = {**bundles.array_spec(self.model_dir, layer, array),
                "metadata_cache_pool": "cache_pool#meta",
                "recheck_cached_data": "open"}
        try:
            return ts.open(spec, open=True, read=True, context=self.context).result()
        except Exception as e:
            raise bundles.StoreError(f"{spec['kvstore']['path']}: cannot open ({e}); run "
                                     f"`flashjax verify {self.model_dir}`") from None

    @property
    def staging_bytes(self) -> int:
        return self.staging.nbytes

    def read(self, layer: int, ids) -> np.ndarray:
        """Read rows ``ids`` (sorted ascending int array, or a slice) of ``layer`` into the
        start of the staging buffer; returns that view. The view is overwritten by the next
        read: consume it (copy to the device) first."""
        stores = self.stores[layer]
        n = stores[0].shape[0]
        count = len(range(*ids.indices(n))) if isinstance(ids, slice) else len(ids)
        if count == 0:
            return self.staging[:0]
        try:
            if self.bundled:
                self._staging_ts[0:count].write(stores[0][ids]).result()
            else:
                d = self.d_model
                parts = [self._staging_ts[0:count, 0:d].write(stores[0][ids]),
                         self._staging_ts[0:count, d:2 * d].write(stores[1][ids])]
                for part in parts:
                    part.result()
        except Exception as e:
            raise bundles.StoreError(f"{self.model_dir}/{bundles.FFN_DIR}/{bundles.layer_key(layer)}:"
                                     f" reading {count} bundle rows failed ({e})") from None
        rows = self.staging[:count]
        if self.checksums is not None:
            ids_arr = np.arange(n)[ids] if isinstance(ids, slice) else ids
            bundles.check_rows(rows, ids_arr, self.checksums[layer],
                               where=f"{self.model_dir}/ffn/{bundles.layer_key(layer)}")
        return rows
