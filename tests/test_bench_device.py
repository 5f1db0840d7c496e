"""device_limit: a short sweep on a small scratch file, and throughput_at on a hand-made result."""

import errno
import os

import pytest

from flashjax.bench import device
from flashjax.bench.device import (DirectIOUnsupportedError, device_limit, format_table,
                                   plot_device_limit, throughput_at)

POINT_KEYS = {"chunk_bytes", "concurrency", "reads", "bytes", "wall_s", "gb_s", "median_us",
              "p90_us", "storage_bytes", "storage_ratio", "method"}


@pytest.mark.parametrize("method", ["best", "io_uring", "threads"])
def test_sweep_reads_from_storage(tmp_path, method):
    if method != "threads" and device._uring_api() is None:
        pytest.skip("io_uring is unavailable here")
    try:
        result = device_limit(tmp_path, chunk_sizes=(4096, 65536), concurrencies=(1, 4),
                              seconds=0.2, file_bytes=64 << 20, progress=False, method=method)
    except DirectIOUnsupportedError as e:
        pytest.skip(f"the tmp filesystem refuses O_DIRECT: {e}")
    assert result["method"] == {"best": "io_uring or threads"}.get(method, method)
    if result["filesystem"].split()[0] in ("tmpfs", "ramfs"):
        pytest.skip(f"{result['filesystem']} accepts O_DIRECT but has no storage beneath it")

    assert list(tmp_path.iterdir()) == []  # scratch file deleted
    assert result["direct_io"] and result["file_bytes"] == 64 << 20
    points = result["points"]
    assert [(p["chunk_bytes"], p["concurrency"]) for p in points] == [
        (4096, 1), (4096, 4), (65536, 1), (65536, 4)]
    for p in points:
        assert set(p) == POINT_KEYS
        assert p["method"] in result["method"].split(" or ")
        assert p["reads"] > 0 and p["bytes"] == p["reads"] * p["chunk_bytes"]
        assert p["gb_s"] > 0 and 0 < p["median_us"] <= p["p90_us"]
        assert p["wall_s"] >= 0.2
        if p["storage_bytes"] is None:
            pytest.skip("/proc/self/io has no read_bytes (no task IO accounting)")
        # O_DIRECT reads must reach the device, not the page cache.
        assert p["storage_bytes"] >= 0.9 * p["bytes"], p

    table = format_table(result)
    assert "4KiB" in table and "64KiB" in table and len(table.splitlines()) == 4
    png = plot_device_limit(result, tmp_path / "plots" / "device.png", mark_chunk=16384)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# The 1 MiB file is read over and over within a point, so the page cache serves most reads and
# device_limit warns about it; the warning is right and beside the point here.
@pytest.mark.filterwarnings("ignore:device_limit")
def test_direct_io_refused(tmp_path, monkeypatch):
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(1 << 20))
    real_open = os.open

    def refuse_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(device.os, "open", refuse_direct)
    with pytest.raises(DirectIOUnsupportedError, match=r"O_DIRECT refused for .*data\.bin"):
        device_limit(data, chunk_sizes=(4096,), concurrencies=(1,), seconds=0.05,
                     progress=False)
    result = device_limit(data, chunk_sizes=(4096,), concurrencies=(1, 2), seconds=0.05,
                          allow_page_cache=True, progress=False)
    assert not result["direct_io"] and len(result["points"]) == 2
    assert result["method"] == "threads"  # io_uring here serves O_DIRECT reads only
    with pytest.raises(ValueError, match="method='io_uring' needs"):
        device_limit(data, chunk_sizes=(4096,), concurrencies=(1,), seconds=0.05,
                     allow_page_cache=True, progress=False, method="io_uring")
    with pytest.raises(ValueError, match="method='aio'; expected 'best'"):
        device_limit(data, chunk_sizes=(4096,), concurrencies=(1,), seconds=0.05,
                     allow_page_cache=True, progress=False, method="aio")


def test_throughput_at_interpolates_in_log2_chunk():
    points = [{"chunk_bytes": c, "concurrency": n, "gb_s": g}
              for c, n, g in [(4096, 1, 0.1), (16384, 1, 0.3), (4096, 8, 1.0), (16384, 8, 2.0)]]
    result = {"points": points}
    assert throughput_at(result, 4096, 8) == pytest.approx(1.0)
    assert throughput_at(result, 8192, 8) == pytest.approx(1.5)  # halfway in log2
    assert throughput_at(result, 8192, 1) == pytest.approx(0.2)
    assert throughput_at(result, 16384, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="concurrency=4 was not measured"):
        throughput_at(result, 8192, 4)
    with pytest.raises(ValueError, match="outside the measured range"):
        throughput_at(result, 65536, 8)


def test_rejects_unaligned_chunks(tmp_path):
    with pytest.raises(ValueError, match=r"chunk_sizes \[5000\]"):
        device_limit(tmp_path, chunk_sizes=(5000,), concurrencies=(1,), progress=False)


def test_sweep_over_a_set_of_files(tmp_path):
    """A store's shard files: reads spread over all of them, each chunk inside its file."""
    sizes = [3 << 20, 1 << 20, (2 << 20) + 4096]
    files = []
    for i, size in enumerate(sizes):
        f = tmp_path / f"shard{i}"
        f.write_bytes(os.urandom(size))
        files.append(f)
    try:
        result = device_limit(files, chunk_sizes=(4096, 1 << 20), concurrencies=(1, 2),
                              seconds=0.1, progress=False)
    except DirectIOUnsupportedError as e:
        pytest.skip(f"the tmp filesystem refuses O_DIRECT: {e}")
    assert result["files"] == 3 and result["file"] is None
    assert result["file_bytes"] == sum(sizes)
    assert all(p["reads"] > 0 and p["bytes"] == p["reads"] * p["chunk_bytes"]
               for p in result["points"])
    with pytest.raises(ValueError, match="largest chunk"):
        device_limit(files[1:2], chunk_sizes=(2 << 20,), concurrencies=(1,), seconds=0.05,
                     progress=False)
    with pytest.raises(FileNotFoundError, match="not files"):
        device_limit([tmp_path / "absent"], chunk_sizes=(4096,), concurrencies=(1,),
                     seconds=0.05, progress=False)


def test_an_empty_file_list_is_refused():
    with pytest.raises(FileNotFoundError, match="none given"):
        device_limit([], chunk_sizes=(4096,), concurrencies=(1,), seconds=0.05, progress=False)


def test_batch_rate_reads_whole_batches_from_storage(tmp_path):
    """Reads in batches of the engine's size: every read a whole chunk from the device."""
    from flashjax.bench.device import batch_rate

    files = []
    for i, size in enumerate((2 << 20, 1 << 20)):
        f = tmp_path / f"shard{i}"
        f.write_bytes(os.urandom(size))
        files.append(f)
    try:
        rate = batch_rate(files, chunk=8192, batch=5, concurrency=2, seconds=0.1)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        pytest.skip(f"the tmp filesystem refuses O_DIRECT: {e}")
    if rate is None:
        pytest.skip("io_uring is unavailable here")
    assert rate["batch"] == 5 and rate["concurrency"] == 2 and rate["chunk_bytes"] == 8192
    assert rate["batches"] >= 1 and rate["bytes"] == rate["batches"] * 5 * 8192
    assert 0 < rate["wall_s"] and rate["gb_s"] == pytest.approx(rate["bytes"] / rate["wall_s"]
                                                                / 1e9)
    assert 0 < rate["median_batch_ms"] <= rate["wall_s"] * 1e3
    if rate["storage_bytes"] is not None:
        fs = device._filesystem_of(tmp_path).split()[0]
        if fs not in ("tmpfs", "ramfs"):
            assert rate["storage_ratio"] >= 0.9, rate  # O_DIRECT: from the device
    with pytest.raises(ValueError, match="no file holds a chunk of 4194304"):
        batch_rate(files, chunk=4 << 20, batch=2, seconds=0.05)
    with pytest.raises(ValueError, match="chunk=5000"):
        batch_rate(files, chunk=5000, batch=2, seconds=0.05)


def test_batch_rate_without_io_uring_is_none(monkeypatch, tmp_path):
    import sys

    from flashjax.bench.device import batch_rate

    monkeypatch.setitem(sys.modules, "uring_api", None)  # import fails
    assert batch_rate([tmp_path / "absent"], chunk=4096, batch=2) is None
