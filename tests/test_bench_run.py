"""``flashjax bench`` end to end on a small sparse model (device sweep off: it has its own test)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flashjax.cli import main
from flashjax.testing import synthetic_store, tiny_llama_config, tiny_opt_config


def test_bench_reports_every_configuration(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # (--device sets it; restored afterwards)
    cfg = tiny_opt_config(hidden_size=64, ffn_dim=2048, num_hidden_layers=2)
    synthetic_store(tmp_path, cfg, ffn_active=0.05)
    assert main(["bench", str(tmp_path / "fj"), "--dram-budget", "40%", "--tokens", "6",
                 "--no-device-limit", "--json", str(tmp_path / "b.json"),
                 "--plots", str(tmp_path / "plots"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "configuration" in out and "naive" in out and "computed on cpu" in out
    result = json.loads((tmp_path / "b.json").read_text())
    configs = result["configs"]
    assert list(configs) == ["naive", "hybrid", "predictor", "predictor+window unbundled",
                             "predictor+window, no overlap", "predictor+window"]
    # the same rows whether reads overlap device work or not
    assert configs["predictor+window, no overlap"]["rows_read_per_token"] == \
        configs["predictor+window"]["rows_read_per_token"]
    # unbundled: the same rows, from two arrays
    assert configs["predictor+window unbundled"]["flash_bytes_per_token"] == \
        configs["predictor+window"]["flash_bytes_per_token"]
    for name, r in configs.items():
        for key in ("ms_per_token", "io_ms", "memory_ms", "compute_ms", "flash_bytes_per_token",
                    "read_gbps", "storage_bytes_read"):
            assert key in r, (name, key)
        # every configuration within the one budget
        assert r["peak_dram_bytes"] <= r["budget_bytes"] == configs["naive"]["budget_bytes"]
    # the naive baseline reads every row every token; the predictor a small part of that
    assert configs["naive"]["rows_read_per_token"] == 2 * 2048
    assert configs["predictor+window"]["flash_bytes_per_token"] < \
        0.1 * configs["naive"]["flash_bytes_per_token"]
    assert configs["hybrid"]["flash_bytes_per_token"] < configs["naive"]["flash_bytes_per_token"]
    assert set(result["window_sweep"]) == {"1", "2", "4", "8"}
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"latency_breakdown.png",
                                                                 "window_rows.png", "table.md"}
    # the device it computed on, and what crossed to it: naive sends every row every token
    # (padded to compiled sizes), the predictor with its window a small part of that
    assert result["compute_device"]["platform"] == "cpu"
    assert configs["naive"]["compute_device"]["platform"] == "cpu"
    naive_rows = configs["naive"]["host_to_device_row_bytes_per_token"]
    assert 2 * 2048 * result["row_bytes"] <= naive_rows < 1.1 * 2 * 2048 * result["row_bytes"]
    assert configs["predictor+window"]["host_to_device_row_bytes_per_token"] < 0.1 * naive_rows
    assert configs["predictor+window"]["device_to_host_bytes_per_token"] == 2 * 2048 * 4
    assert "host -> device MB per token" in out
    table = (tmp_path / "plots" / "table.md").read_text().splitlines()
    assert table[0] == "Computed on cpu." and table[1] == ""
    table = table[2:]
    assert len(table) == 2 + len(configs)  # header, rule, one row per configuration
    naive = table[2].split(" | ")
    assert naive[0] == "| naive" and naive[5] == f"**{configs['naive']['ms_per_token']:.1f}**"
    assert naive[-3] == "-"  # no device measured: no fraction
    assert float(naive[-2]) == pytest.approx(
        configs["naive"]["host_to_device_bytes_per_token"] / 1e6, abs=1e-3)


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_bench_with_an_activity_trace(tmp_path, family):
    """Trace-driven bench on OPT and on a Llama store (three-part bundles, read as three
    arrays unbundled)."""
    from flashjax.bench.activity import ActivityTrace
    from flashjax.bench.run import bench

    cfg = tiny_opt_config(hidden_size=64, ffn_dim=1024, num_hidden_layers=2) \
        if family == "opt" else \
        tiny_llama_config(hidden_size=64, intermediate_size=1024, num_hidden_layers=2)
    synthetic_store(tmp_path, cfg)  # random weights: ~half the neurons fire
    rng = np.random.default_rng(0)
    active = rng.random((16, 2, 1024)) < 0.04
    trace = ActivityTrace(active).save(tmp_path / "t.npz")
    result = bench(tmp_path / "fj", dram_budget="90%", tokens=5, windows=(1, 4), device=False,
                   trace=str(trace), prompt_tokens=3, progress=False)
    configs = result["configs"]
    assert "oracle+window" not in configs
    assert configs["predictor"]["options"] == {"predictor": "trace", "trace": str(trace),
                                               "window": 1}
    # the trace decides: about 4% of 2 x 1024 rows per token, not the random model's half
    assert configs["predictor"]["rows_needed_per_token"] == pytest.approx(0.04 * 2048, rel=0.3)
    assert result["window_sweep"]["1"] == configs["predictor"]["rows_read_per_token"]
    assert configs["predictor"]["rows_per_read_median"] > 0
    parts = 2 if family == "opt" else 3
    assert result["row_parts"] == parts and result["row_bytes"] == parts * 64 * 2
    assert configs["naive"]["flash_bytes_per_token"] == 2 * 1024 * result["row_bytes"]
    unbundled = configs["predictor+window unbundled"]
    assert unbundled["flash_bytes_per_token"] == configs["predictor+window"]["flash_bytes_per_token"]


def test_device_comparison_interpolates_size_and_concurrency():
    from flashjax.bench.run import _device_gbps_at

    limit = {"points": [{"chunk_bytes": c, "concurrency": n, "gb_s": c / 4096 * n / 100}
                        for c in (4096, 16384) for n in (1, 4, 16)]}
    assert _device_gbps_at(limit, 4096, 4) == pytest.approx(0.04)
    assert _device_gbps_at(limit, 8192, 4) == pytest.approx(0.10)  # halfway in log2 size
    assert _device_gbps_at(limit, 4096, 8) == pytest.approx(0.10)  # halfway in log2 threads
    assert _device_gbps_at(limit, 1024, 64) == pytest.approx(0.16)  # clamped to the range


def test_each_configuration_is_compared_with_the_device_at_its_own_read_size():
    from flashjax.bench.run import compare_with_device

    limit = {"points": [{"chunk_bytes": c, "concurrency": n, "gb_s": c / 4096 * n / 100}
                        for c in (4096, 8192, 16384) for n in (1, 4, 16)],
             "read_gbps_best": 5.0}
    base = {"reader_threads": 32, "rows_per_read_median": 4, "storage_gbps": 0.08,
            "read_gbps": 0.08}
    bundled = {**base, "options": {"predictor": "lowrank"}}
    unbundled = {**base, "options": {"predictor": "lowrank", "bundled": False}}
    naive = {**base, "options": {"predictor": None}}
    for r in (bundled, unbundled, naive):
        compare_with_device(r, limit, row_bytes=16384)
    assert bundled["device_chunk_bytes"] == 16384
    assert bundled["device_fraction"] == pytest.approx(0.08 / 0.16)
    assert unbundled["device_chunk_bytes"] == 8192  # two half-bundle reads per neuron
    assert unbundled["device_fraction"] == pytest.approx(0.08 / 0.08)
    assert naive["device_chunk_bytes"] is None and naive["device_fraction"] == pytest.approx(0.016)
    tiny = {**unbundled}
    compare_with_device(tiny, limit, row_bytes=1024)  # 512-byte halves still cost a block each
    assert tiny["device_chunk_bytes"] == 4096


def test_bench_puts_each_layout_against_its_own_files(tmp_path):
    """The device sweep reads the store's shard files; the unbundled configuration is put
    against a sweep over the unbundled copy's files, at its half-bundle read size."""
    from flashjax.bench.activity import ActivityTrace
    from flashjax.bench.device import DirectIOUnsupportedError
    from flashjax.bench.run import _device_gbps_at, bench

    cfg = tiny_opt_config(hidden_size=64, ffn_dim=1024, num_hidden_layers=2)
    synthetic_store(tmp_path, cfg)
    active = np.random.default_rng(0).random((12, 2, 1024)) < 0.04
    trace = ActivityTrace(active).save(tmp_path / "t.npz")
    try:
        result = bench(tmp_path / "fj", dram_budget="90%", tokens=3, windows=(4,),
                       device=True, device_seconds=0.05, trace=str(trace), prompt_tokens=3,
                       progress=False)
    except DirectIOUnsupportedError as e:
        pytest.skip(f"the tmp filesystem refuses O_DIRECT: {e}")
    bundled, split = result["device_limit"], result["device_limit_unbundled"]
    assert bundled["files"] == 2 and bundled["path"].endswith("/fj/ffn")
    assert split["files"] == 4 and split["path"].endswith("ffn_split")
    # 256 B rows and 128 B halves both cost one 4 KiB block: a bundle saves half the reads
    assert split["bundling_gain_same_files"] == pytest.approx(2.0)
    assert bundled["bundling_gain"] == pytest.approx(2.0)
    unb = result["configs"]["predictor+window unbundled"]
    conc = max(1, min(unb["reader_threads"], unb["rows_per_read_median"]))
    assert unb["device_gbps_same_pattern"] == pytest.approx(_device_gbps_at(split, 4096, conc))
    for name, r in result["configs"].items():
        assert r["device_fraction"] is not None and r["device_fraction"] > 0, name
    # row-set configurations are also put against batches of their own size, on their files
    from flashjax.store.reader import uring_api

    if uring_api is None or not uring_api.is_available():
        return
    for name in ("predictor", "predictor+window", "predictor+window unbundled"):
        r = result["configs"][name]
        same = r["device_same_batches"]
        halves = 2 if name.endswith("unbundled") else 1
        assert same["batch"] == round(r["rows_per_read_median"]) * halves, name
        assert same["chunk_bytes"] == 4096 and same["concurrency"] == r["reader_threads"]
        assert r["device_fraction_same_batches"] == pytest.approx(
            r["storage_gbps"] / same["gb_s"]), name
    assert "device_same_batches" not in result["configs"]["naive"]


def test_bench_on_a_quantized_store(tmp_path, capsys):
    """An int4 store benches like a float one, its rows a quarter-ish of the bytes; the
    unbundled configuration (float stores only) is reported as not run."""
    import flashjax

    cfg = tiny_opt_config(hidden_size=64, ffn_dim=2048, num_hidden_layers=2)
    synthetic_store(tmp_path, cfg, ffn_active=0.05)
    flashjax.quantize(tmp_path / "fj", tmp_path / "q", "int4", progress=False)
    assert main(["bench", str(tmp_path / "q"), "--dram-budget", "40%", "--tokens", "4",
                 "--windows", "1,4", "--no-device-limit", "--json",
                 str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "int4 FFN rows" in out and "storage requests per token (mean request): naive" in out
    assert "not run: predictor+window unbundled (an int4 store is read bundled only)" in out
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["row_bytes"] == 80 and result["ffn_dtype"] == "int4"  # 64 B + 8 B scales
    configs = result["configs"]
    assert "predictor+window unbundled" not in configs
    assert configs["naive"]["flash_bytes_per_token"] == 2 * 2048 * 80
    # requests: adjacent rows merge (naive: a request per staging buffer of rows, here 32);
    # never more requests than rows
    for r in configs.values():
        assert 0 < r["requests_per_token"] <= r["rows_read_per_token"]
    assert configs["naive"]["requests_per_token"] <= configs["naive"]["rows_read_per_token"] / 32


def test_bench_on_a_missing_device_is_refused(tmp_path, capsys):
    """--device gpu where JAX has no GPU: an error that says so, nothing run."""
    import os

    import jax

    if jax.default_backend() != "cpu":
        pytest.skip("a GPU is here")
    cfg = tiny_opt_config(hidden_size=64, ffn_dim=256, num_hidden_layers=1)
    synthetic_store(tmp_path, cfg, ffn_active=0.05)
    env = os.environ.get("JAX_PLATFORMS")
    code = main(["bench", str(tmp_path / "fj"), "--tokens", "2", "--no-device-limit",
                 "--device", "gpu"])
    err = capsys.readouterr().err
    assert code != 0 and "--device gpu" in err and "Traceback" not in err
    assert os.environ.get("JAX_PLATFORMS") == env  # nothing changed for what runs next
