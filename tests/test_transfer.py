"""What crosses between host and device while a flash model generates: only the rows read
for the token (padded to a compiled size), their small plan, and the selector's decision
coming back; the accelerator's path (explicit transfers) computes the same as the CPU's."""

from __future__ import annotations

import contextlib

import jax
import numpy as np
import pytest

import flashjax
from flashjax.cache import bucket_for
from flashjax.engine import kernels, selectors
from flashjax.engine.kernels import RowUpdate
from flashjax.engine.transfer import Transfers
from flashjax.testing import synthetic_store, tiny_opt_config

PROMPT = [2, 11, 25, 37, 48, 59]
NEW = 12


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    cfg = tiny_opt_config(hidden_size=64, ffn_dim=2048, num_hidden_layers=3)
    return synthetic_store(tmp_path_factory.mktemp("transfer"), cfg, seed=3, ffn_active=0.05)


class Recording(Transfers):
    """Transfers that also keep what each call handed over, beside the engine's own counts."""

    def __init__(self, explicit):
        super().__init__(explicit=explicit)
        self.log = []

    def put(self, stats, kind, *arrays):
        self.log.append((kind, [np.array(a) for a in arrays]))
        return super().put(stats, kind, *arrays)

    def stage(self, stats, rows, packed):
        self.log.append(("stage", [np.array(rows), np.array(packed)]))
        return super().stage(stats, rows, packed)


def _generate_guarded(flash, on_token=None):
    """Generate NEW tokens; from the first chosen token on (every decode step), any
    transfer between host and device, either way, that is not an explicit one raises."""
    guard = contextlib.ExitStack()

    def start(ids):
        if len(ids) == 1:
            guard.enter_context(jax.transfer_guard("disallow"))
        if on_token is not None:
            on_token(ids)

    with guard:
        return flash.generate(PROMPT, NEW, stop_at_eos=False, return_stats=True,
                              on_token=start)


def _recording(flash, explicit):
    rec = Recording(explicit)
    flash.transfers = flash.schedule.transfers = rec
    return rec


@pytest.mark.parametrize("overlap", [True, False])
def test_only_the_new_rows_cross_to_the_device(store, overlap):
    """The accelerator's path run on CPU under jax's transfer guard: nothing crosses but
    what ``Transfers`` hands over. Per decode token that is the rows read this token (each
    transfer exactly the rows read, padded to the smallest compiled size that holds them),
    their packed plans and held-row masks; the token's ids and positions stay on the device;
    back come one score vector per layer."""
    flash = flashjax.load(store, dram_budget=0.5, predictor="oracle", window=4,
                          overlap=overlap, explicit_transfers=True)
    assert flash.transfers.explicit
    flash.generate([2, 5], 1)  # compiles
    rec = _recording(flash, explicit=True)
    ids, stats = _generate_guarded(flash)
    dense = flashjax.load(store, progress=False)
    assert ids == dense.generate(PROMPT, NEW, stop_at_eos=False)

    cfg, row_bytes = flash.cfg, flash.reader.staging.shape[1] * flash.reader.staging.itemsize
    h2d = stats["host_to_device_bytes_per_token"]
    tokens = stats["tokens"]
    assert tokens == len(PROMPT) + NEW - 1
    # the log, split per kind, agrees with the engine's counts
    staged = [arrays for kind, arrays in rec.log if kind == "stage"]
    updates = [RowUpdate.unpack(p) for _, p in staged]
    real = [int(u.count) for u in updates]
    no_slot = [b.rows for b in flash._buffers]
    holes = [int(np.isin(np.asarray(u.holes), no_slot, invert=True).sum()) for u in updates]
    padded = [r.shape[0] for r, _ in staged]
    assert sum(r.nbytes for r, _ in staged) == sum(h2d["rows"])
    assert sum(p.nbytes for _, p in staged) + sum(
        sum(a.nbytes for a in arrays) for kind, arrays in rec.log if kind == "plan"
    ) == sum(h2d["plan"])
    # rows: every transfer holds the rows one read brought, padded to their compiled size
    assert sum(real) == stats["rows_loaded"] + stats["rows_streamed"] > 0
    all_sizes = [s for s in (*flash.sizes, flash.stream_sizes) if s]
    assert all(any(p == bucket_for(max(r, h), sizes) for sizes in all_sizes)
               for r, h, p in zip(real, holes, padded))
    assert all(r > 0 for r in real)  # a piece of moves only sends no rows:
    moves_only = [a for kind, arrays in rec.log if kind == "plan" for a in arrays
                  if a.dtype == np.int32]  # its packed update goes alone
    assert moves_only and all(RowUpdate.unpack(p).count == 0 for p in moves_only)
    assert sum(h2d["rows"]) == sum(padded) * row_bytes
    assert sum(padded) < 1.1 * sum(real) + 8 * len(real)
    # per token: rows read x row bytes (+ padding); nothing else but plan and inputs
    per_token_rows = np.array(h2d["rows"]) / row_bytes
    assert (per_token_rows >= np.array(stats["rows_read_per_token"])).all()
    # the plan: per layer at most a mask of the buffer's rows and the packed updates
    for kind, arrays in rec.log:
        if kind == "plan":
            for a in arrays:
                assert a.dtype == np.int32 or (a.dtype == bool and a.shape[0] in
                                               [b.rows for b in flash._buffers])
    # inputs: the prompt's tokens (id, position, valid: 9 bytes each); decode tokens none
    assert h2d["inputs"] == [9] * len(PROMPT) + [0] * (NEW - 1)
    # back: one [N] float32 score vector per layer and token
    assert stats["device_to_host_bytes_per_token"] == \
        [cfg.num_hidden_layers * cfg.ffn_dim * 4] * tokens
    # windowing keeps the traffic small: a decode token moves a fraction of the FFN
    ffn_bytes = cfg.num_hidden_layers * cfg.ffn_dim * row_bytes
    assert np.median(h2d["rows"][len(PROMPT):]) < 0.1 * ffn_bytes
    assert stats["compute_device"]["platform"] == "cpu"
    assert stats["compute_device"]["explicit_transfers"] is True


def test_explicit_transfers_compute_what_the_cpu_path_computes(store):
    """The same tokens, logits, reads and transfer counts whichever way host arrays reach
    the device; the CPU path's transfers are implicit (the guard would refuse them)."""
    runs = {}
    for explicit in (False, True):
        flash = flashjax.load(store, dram_budget=0.4, predictor="oracle", window=3,
                              explicit_transfers=explicit)
        assert flash.transfers.explicit is explicit
        ids, stats = flash.generate(PROMPT, NEW, stop_at_eos=False, return_stats=True)
        runs[explicit] = (ids, stats, flash.logits(PROMPT + ids))
    (ids_a, st_a, lg_a), (ids_b, st_b, lg_b) = runs[False], runs[True]
    assert ids_a == ids_b
    np.testing.assert_allclose(lg_a, lg_b, rtol=0, atol=0)
    for key in ("rows_read_per_token", "host_to_device_bytes_per_token",
                "device_to_host_bytes_per_token"):
        assert st_a[key] == st_b[key], key
    flash = flashjax.load(store, dram_budget=0.4, predictor="oracle", window=3)
    flash.generate([2, 5], 1)
    with pytest.raises(Exception, match="Disallowed host-to-device"):
        _generate_guarded(flash)


@pytest.mark.parametrize("predictor", ["oracle", "naive"])
def test_one_round_trip_per_layer(store, monkeypatch, predictor):
    """Per decode step the host fetches one thing per layer, the selector's scores (none for
    a selector that needs no decision), and the chosen token: nothing else comes back (the
    guard refuses any implicit fetch)."""
    flash = flashjax.load(store, dram_budget=0.5, predictor=predictor,
                          explicit_transfers=True)
    flash.generate([2, 5], 1)
    fetches, per_token = [], []
    real = jax.device_get

    def counted(x):
        fetches.append(np.shape(x))
        return real(x)

    def on_token(ids):
        per_token.append(len(fetches))
        fetches.clear()

    monkeypatch.setattr(jax, "device_get", counted)
    ids, stats = _generate_guarded(flash, on_token)
    layers, n = flash.cfg.num_hidden_layers, flash.cfg.ffn_dim
    decode = per_token[1:]  # each from one decode step to the next token chosen
    assert len(decode) == NEW - 1
    expected = layers + 1 if predictor == "oracle" else 1
    assert decode == [expected] * (NEW - 1)
    assert stats["device_to_host_bytes_per_token"][len(PROMPT):] == \
        [layers * n * 4 if predictor == "oracle" else 0] * (NEW - 1)


@pytest.mark.parametrize("explicit", [False, True])
def test_no_compilation_while_decoding(store, explicit):
    """Every decode step runs kernels compiled before it: after the first token, nothing is
    traced again, whichever way the inputs arrive."""
    flash = flashjax.load(store, dram_budget=0.5, predictor="oracle",
                          explicit_transfers=explicit)
    flash.generate([2, 5], 1)
    jitted = (kernels.embed, kernels.attend, kernels.ffn_held, kernels.ffn_staged,
              kernels.finish, kernels.head, kernels.update_buffer, kernels.move_rows,
              kernels.zeros_like, selectors._oracle_scores)
    sizes = [f._cache_size() for f in jitted]
    with jax.no_tracing():
        flash.generate(PROMPT, 20, stop_at_eos=False)
    assert [f._cache_size() for f in jitted] == sizes


def test_moves_without_rows_send_no_rows(store):
    """A piece of moves only (rows left the window, none arrive) runs ``move_rows``: the
    buffer is rearranged on the device with no staged rows sent."""
    flash = flashjax.load(store, dram_budget=0.5, predictor="oracle",
                          explicit_transfers=True)
    buf = flash._buffers[0]
    before = [np.asarray(p).copy() for p in buf.parts]
    packed = RowUpdate.pack(8, [], no_slot=buf.rows, holes=[0, 3], movers=[5, 6])
    (packed,) = flash.transfers.put_uncounted(packed)
    new, _ = kernels.move_rows(buf, packed)
    for old, part in zip(before, new.parts):
        part = np.asarray(part)
        np.testing.assert_array_equal(part[[0, 3]], old[[5, 6]])
        np.testing.assert_array_equal(part[1:3], old[1:3])
    flash._buffers[0] = new
