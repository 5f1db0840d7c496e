"""Host <-> device traffic of the decode loop, in one place.

Everything the host hands the device while a flash model generates goes through
``Transfers.put``, counted by kind:

* ``rows``: the FFN rows read from flash this token (the only weights that move), in the
  staging buffer's storage layout and padded to a compiled row count;
* ``plan``: the small arguments of a buffer change (the packed moves and appends) and the
  mask of held rows an FFN piece runs over;
* ``inputs``: the token's ids, positions and validity.

``Transfers.get`` brings back what the host needs to decide a layer's reads: the selector's
scores, the one round trip per layer.

On an accelerator ``put`` is one explicit ``jax.device_put`` of its arrays to the model's device.
On XLA:CPU the host arrays are handed to the jitted call as they are, counted the same: the
CPU client reads page-aligned memory (the staging buffers) in place, and dispatching a numpy
argument costs ~8 us against ~30 us for a ``device_put`` first. ``explicit=True`` takes the
accelerator's path on any backend; under ``jax.transfer_guard("disallow")`` it then proves
that no transfer of the decode loop escapes the count (tests do this on CPU).
"""

from __future__ import annotations

import jax
import numpy as np

KINDS = ("rows", "plan", "inputs")


class Transfers:
    """Moves host arrays to ``device`` (default: JAX's default device) and counts the bytes in
    a generation's ``Stats``; ``explicit``: ``device_put`` even on CPU (None: on accelerators
    only)."""

    def __init__(self, device=None, explicit: bool | None = None):
        self.device = jax.devices()[0] if device is None else device
        self.explicit = self.device.platform != "cpu" if explicit is None else bool(explicit)

    def put(self, stats, kind: str, *arrays):
        """``arrays`` (numpy) as the device's inputs, in one transfer; a tuple of as many."""
        stats.to_device(kind, sum(int(a.nbytes) for a in arrays))
        return self.put_uncounted(*arrays)

    def put_uncounted(self, *arrays):
        """As ``put``, outside any generation (the kernels' warm-up)."""
        if not self.explicit:
            return arrays
        return tuple(jax.device_put(arrays, self.device))

    def stage(self, stats, rows, packed):
        """Staged rows and their packed update, counted as rows and plan, in one transfer."""
        stats.to_device("rows", int(rows.nbytes))
        stats.to_device("plan", int(packed.nbytes))
        return self.put_uncounted(rows, packed)

    def get(self, stats, array) -> np.ndarray:
        """A device array's value on the host (counted as the decision's round trip)."""
        host = np.asarray(jax.device_get(array))
        stats.to_host(host.nbytes)
        return host

    def describe(self) -> dict:
        """The device the engine computes on, for reports."""
        return device_info(self.device) | {"explicit_transfers": self.explicit}


def device_info(device=None) -> dict:
    """platform (cpu, gpu, tpu), device_kind (e.g. "NVIDIA H200"), jax version, device count."""
    device = jax.devices()[0] if device is None else device
    return {"platform": device.platform, "device_kind": device.device_kind,
            "devices": jax.device_count(), "jax": jax.__version__}


def device_label(info: dict) -> str:
    """``device_info()`` in words: "cpu", or "gpu (NVIDIA H200)"."""
    kind = info["device_kind"]
    return info["platform"] + ("" if kind == info["platform"] else f" ({kind})")


PLATFORMS = {"cpu": "cpu", "gpu": "cuda"}  # --device names -> JAX_PLATFORMS values


def use_device(name: str) -> dict:
    """Compute on ``name`` ("cpu" or "gpu") in this process and the worker processes it
    starts (``JAX_PLATFORMS``); JAX must not have picked another backend yet. Returns
    ``device_info()``; raises ValueError naming what JAX found when that device is absent
    (and changes nothing then)."""
    import os

    if name not in PLATFORMS:
        raise ValueError(f"unknown device {name!r}; expected one of {sorted(PLATFORMS)}")
    before = jax.config.jax_platforms
    try:
        jax.config.update("jax_platforms", PLATFORMS[name])
        device = jax.devices()[0]
    except Exception as e:  # (a missing plugin may surface as RuntimeError or AssertionError)
        jax.config.update("jax_platforms", before)
        why = f" ({e})" if str(e) else ""
        raise ValueError(f"--device {name}: JAX has no {name} backend here{why}; on a CUDA "
                         f"machine install flashjax[gpu]") from None
    if device.platform != name:
        jax.config.update("jax_platforms", before)
        raise ValueError(f"--device {name}: JAX already computes on {device.platform} in this "
                         f"process; set JAX_PLATFORMS={PLATFORMS[name]} before starting it")
    os.environ["JAX_PLATFORMS"] = PLATFORMS[name]
    return device_info(device)
