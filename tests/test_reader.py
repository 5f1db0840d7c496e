"""The reader's paths (TensorStore row reads, io_uring row reads, sequential range reads) give
the same rows as the store."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flashjax.store import bundles
from flashjax.store.manifest import Manifest
from flashjax.store.reader import FlashReader, shard_row_offsets
from flashjax.testing import synthetic_store, tiny_opt_config

# 64-wide float16 bundles: 256-byte rows, so most runs start inside a 4 KiB block
CFG = tiny_opt_config(hidden_size=64, ffn_dim=1024, num_hidden_layers=2)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader")
    return synthetic_store(root, CFG, seed=2)


@pytest.mark.parametrize("direct_io", [True, False])
def test_range_reads_equal_the_stored_rows(store, direct_io):
    manifest = Manifest.read(store)
    reader = FlashReader(store, manifest, max_rows=600, direct_io=direct_io, verify=True)
    for layer in range(2):
        disk = bundles.read_layer(store, layer)
        for start, stop in [(0, 600), (1, 2), (3, 517), (16, 32), (424, 1024), (1023, 1024)]:
            rows = reader.read_range(layer, start, stop)
            np.testing.assert_array_equal(rows, disk[start:stop])
            # and the TensorStore path agrees
            np.testing.assert_array_equal(reader.read(layer, np.arange(start, stop)),
                                          disk[start:stop])
    reader.close()


def test_offsets_come_from_the_shard_index(store):
    manifest = Manifest.read(store)
    array = store / bundles.FFN_DIR / bundles.layer_key(0)
    offsets = shard_row_offsets(array, 1024, manifest.row_bytes)
    assert offsets is not None and offsets[0] == 0
    assert (np.diff(offsets) == manifest.row_bytes).all()
    # any other layout (here: a row size that does not match the index) is refused
    assert shard_row_offsets(array, 1024, manifest.row_bytes + 2) is None
    meta = json.loads((array / "zarr.json").read_text())
    meta["codecs"][0]["configuration"]["index_location"] = "start"
    other = store.parent / "other"
    (other / "c" / "0").mkdir(parents=True)
    (other / "zarr.json").write_text(json.dumps(meta))
    (other / "c" / "0" / "0").write_bytes((array / "c" / "0" / "0").read_bytes())
    assert shard_row_offsets(other, 1024, manifest.row_bytes) is None


def test_range_read_of_a_corrupt_row_is_caught(tmp_path):
    synthetic_store(tmp_path, CFG, seed=2)
    manifest = Manifest.read(tmp_path / "fj")
    shard = tmp_path / "fj" / bundles.FFN_DIR / bundles.layer_key(1) / "c" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[700 * manifest.row_bytes + 5] ^= 0x40
    shard.write_bytes(bytes(data))
    reader = FlashReader(tmp_path / "fj", manifest, max_rows=1024, verify=True)
    reader.read_range(1, 0, 700)  # the rows before it are fine
    with pytest.raises(bundles.StoreError, match=r"crc32c mismatch in 1 row\(s\) \(neurons 700\)"):
        reader.read_range(1, 512, 1024)


def _uring_usable() -> bool:
    from flashjax.store import reader

    return reader.uring_api is not None and reader.uring_api.is_available()


@pytest.fixture(scope="module")
def block_store(tmp_path_factory):
    """1024-wide float16 bundles: 4 KiB rows at block-aligned offsets, what io_uring reads."""
    cfg = tiny_opt_config(hidden_size=1024, ffn_dim=512, num_hidden_layers=2,
                          num_attention_heads=8, vocab_size=64, max_position_embeddings=64)
    return synthetic_store(tmp_path_factory.mktemp("blocks"), cfg, seed=4)


@pytest.mark.skipif(not _uring_usable(), reason="io_uring (uring_api) not available here")
def test_io_uring_row_reads_equal_the_stored_rows(block_store):
    manifest = Manifest.read(block_store)
    ring = FlashReader(block_store, manifest, max_rows=300, concurrency=8, io_uring=True,
                       slots=2)
    plain = FlashReader(block_store, manifest, max_rows=300, io_uring=False)
    assert ring.uses_io_uring and not plain.uses_io_uring
    rng = np.random.default_rng(0)
    for layer in range(2):
        disk = bundles.read_layer(block_store, layer)
        for size in (1, 7, 8, 9, 300):  # below, at and above the 8 reads in flight
            ids = np.sort(rng.choice(512, size, replace=False)).astype(np.int32)
            ring.next_slot()
            np.testing.assert_array_equal(ring.read(layer, ids), disk[ids])
            np.testing.assert_array_equal(plain.read(layer, ids), disk[ids])
    ring.close()
    plain.close()


def test_io_uring_refused_with_the_reason(store):
    """io_uring serves O_DIRECT reads from the optional uring_api package; asked for without
    either, the reader says which is missing, and without being asked it falls back."""
    from flashjax.store import reader

    manifest = Manifest.read(store)
    reason = (r"uring_api package is not installed.*flashjax\[uring\]" if reader.uring_api is None
              else r"O_DIRECT")
    with pytest.raises(ValueError, match=r"io_uring reads requested, but .*" + reason):
        FlashReader(store, manifest, max_rows=8, io_uring=True, direct_io=False)
    assert not FlashReader(store, manifest, max_rows=8, direct_io=False).uses_io_uring


# bundle widths: 256 B rows (16 to a block), 384 B rows (some straddle two blocks), 6 KiB rows
# (every other one straddles); and unbundled, halves of 128 B, 192 B and 3 KiB
@pytest.fixture(scope="module", params=[64, 96, 1536])
def odd_store(request, tmp_path_factory):
    cfg = tiny_opt_config(hidden_size=request.param, ffn_dim=700, num_hidden_layers=2,
                          num_attention_heads=4, vocab_size=64, max_position_embeddings=64)
    path = synthetic_store(tmp_path_factory.mktemp(f"odd{request.param}"), cfg, seed=5)
    bundles.write_split(path)
    return path


@pytest.mark.skipif(not _uring_usable(), reason="io_uring (uring_api) not available here")
@pytest.mark.parametrize("bundled", [True, False])
def test_io_uring_reads_rows_smaller_or_unaligned_through_whole_blocks(odd_store, bundled):
    """Rows that are not whole aligned blocks: read as the blocks holding them into the scratch
    ring, then copied; the same bytes as the store, whatever their mix of shared blocks."""
    manifest = Manifest.read(odd_store)
    rings = [FlashReader(odd_store, manifest, max_rows=700, concurrency=4, io_uring=True,
                         bundled=bundled, slots=2, block_slots=slots) for slots in (None, 1)]
    for ring in rings:  # 4 scratch blocks in flight, or 1
        assert ring.uses_io_uring and not any(s.direct for s in ring._uring_sources(0))
    rng = np.random.default_rng(1)
    for layer in range(2):
        disk = bundles.read_layer(odd_store, layer)
        for ids in (np.arange(3), np.arange(690, 700), np.arange(0, 700, 3), np.arange(700),
                    *(np.sort(rng.choice(700, k, replace=False)) for k in (1, 5, 40, 333))):
            for ring in rings:
                ring.next_slot()
                np.testing.assert_array_equal(ring.read(layer, ids.astype(np.int32)), disk[ids])
    for ring in rings:
        ring.close()


@pytest.mark.skipif(not _uring_usable(), reason="io_uring (uring_api) not available here")
def test_io_uring_reads_unbundled_whole_block_halves(tmp_path):
    """2048-wide float16 bundles unbundled: 4 KiB halves, each read straight into its half of
    the staging row."""
    cfg = tiny_opt_config(hidden_size=2048, ffn_dim=300, num_hidden_layers=2,
                          num_attention_heads=8, vocab_size=64, max_position_embeddings=64)
    store = synthetic_store(tmp_path, cfg, seed=6)
    bundles.write_split(store)
    manifest = Manifest.read(store)
    ring = FlashReader(store, manifest, max_rows=300, concurrency=8, io_uring=True,
                       bundled=False)
    assert [s.direct for s in ring._uring_sources(1)] == [True, True]
    disk = bundles.read_layer(store, 1)
    for ids in (np.arange(0, 300), np.sort(np.random.default_rng(2).choice(300, 77, False))):
        np.testing.assert_array_equal(ring.read(1, ids.astype(np.int32)), disk[ids])
    ring.close()


@pytest.mark.skipif(not _uring_usable(), reason="io_uring (uring_api) not available here")
def test_io_uring_read_failure_is_reported_and_the_ring_stays_usable(block_store):
    manifest = Manifest.read(block_store)
    ring = FlashReader(block_store, manifest, max_rows=64, concurrency=8, io_uring=True)
    ids = np.arange(0, 80, 2, dtype=np.int32)  # not consecutive: one read per row
    past_end = np.full(512, 1 << 40, np.int64)  # every row "stored" far past the file's end
    (source,) = ring._uring_sources(0)
    past_end[::4] = source.offsets[::4]  # half of the rows read are real: a mix in flight
    with pytest.raises(OSError, match="short read"):
        ring._read_uring(0, ids, [source._replace(offsets=past_end)])
    disk = bundles.read_layer(block_store, 0)
    np.testing.assert_array_equal(ring.read(0, ids), disk[ids])  # nothing left in the ring
    ring.close()


@pytest.mark.skipif(not _uring_usable(), reason="io_uring (uring_api) not available here")
def test_requests_are_counted_adjacent_rows_as_one(block_store, store):
    """The reader reports the storage requests of each read and their bytes: adjacent 4 KiB
    rows go as one request (up to 128 KiB), scattered ones one each without gap reads (gap
    0), or together with the rows between them when the gaps are small; 256 B rows cost the
    blocks that hold them (rows sharing a block, one request); TensorStore a request a row."""
    manifest = Manifest.read(block_store)
    ring = FlashReader(block_store, manifest, max_rows=300, io_uring=True, gap=0)
    ring.read(0, np.arange(10, 20, dtype=np.int32))
    assert (ring.last_requests, ring.last_request_bytes) == (1, 10 * 4096)
    ring.read(0, np.array([1, 3, 5, 6], np.int32))
    assert (ring.last_requests, ring.last_request_bytes) == (3, 4 * 4096)
    ring.read(0, np.arange(0, 40, dtype=np.int32))  # 160 KiB: split at 128 KiB
    assert (ring.last_requests, ring.last_request_bytes) == (2, 40 * 4096)
    gaps = FlashReader(block_store, manifest, max_rows=300, io_uring=True, gap=4096)
    ids = np.array([1, 3, 5, 6, 9, 30], np.int32)  # gaps of one row, two, and many
    np.testing.assert_array_equal(gaps.read(0, ids), bundles.read_layer(block_store, 0)[ids])
    assert (gaps.last_requests, gaps.last_request_bytes) == (3, 6 * 4096 + 2 * 4096)
    plain = FlashReader(block_store, manifest, max_rows=300, io_uring=False)
    plain.read(0, np.array([1, 3, 5, 6], np.int32))
    assert (plain.last_requests, plain.last_request_bytes) == (4, 4 * 4096)
    small = FlashReader(store, Manifest.read(store), max_rows=300, io_uring=True)
    small.read(0, np.array([0, 1, 2, 100], np.int32))  # 256 B rows: blocks 0 and 6
    assert (small.last_requests, small.last_request_bytes) == (2, 2 * 4096)
    for r in (ring, gaps, plain, small):
        r.close()
