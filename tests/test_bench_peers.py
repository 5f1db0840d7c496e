"""``flashjax bench --peers`` and ``--memory-limit``: the peers' rows, the kernel-enforced limit,
a cold page cache, and the temporary unbundled copy."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from flashjax.bench import limits
from flashjax.bench.run import bench, median_token
from flashjax.cli import main
from flashjax.store import bundles
from flashjax.testing import synthetic_store, tiny_opt_config

pytest.importorskip("accelerate")
CGROUP = limits.available()
needs_cgroup = pytest.mark.skipif(CGROUP is not None, reason=f"no memory cgroup: {CGROUP}")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A small sparse OPT checkpoint in float32 (what save_pretrained writes) and its store."""
    root = tmp_path_factory.mktemp("peers")
    cfg = tiny_opt_config(hidden_size=64, ffn_dim=1024, num_hidden_layers=2)
    synthetic_store(root, cfg, ffn_active=0.05, dtype="float32")
    return root


def test_peers_rows_and_their_tokens_equal_dense(store, tmp_path):
    out = tmp_path / "b.json"
    assert main(["bench", str(store / "fj"), "--dram-budget", "50%", "--tokens", "5",
                 "--no-device-limit", "--peers", str(store / "hf"), "--only",
                 "predictor+window,accelerate-offload,mmap", "--json", str(out),
                 "--plots", str(tmp_path / "plots")]) == 0
    result = json.loads(out.read_text())
    configs = result["configs"]
    assert list(configs) == ["naive", "predictor+window", "accelerate-offload", "mmap"]
    ref = result["reference_tokens"]
    assert ref["source"] == "dense" and len(ref["ids"]) == 5
    for name, r in configs.items():
        assert r["completed"], name
        assert r["ids"] == ref["ids"], name  # the oracle-free configurations are exact
        assert r["same_tokens_as_dense"] is True
        assert r["wall_ms_per_token"] > 0 and r["storage_bytes_per_token"] >= 0
        assert r["max_rss_bytes"] > 0
    # naive reads every row on every step, O_DIRECT: its storage bytes per step are its rows'
    naive = configs["naive"]
    assert naive["storage_bytes_per_token"] == pytest.approx(naive["flash_bytes_per_token"],
                                                             rel=0.05)
    accel = configs["accelerate-offload"]
    assert accel["modules_on_disk"] > 0  # the budget is below the model: layers offloaded
    assert accel["compute_dtype"] == "float32" and accel["attempts"][0]["completed"]
    assert configs["mmap"]["compute_dtype"] == "float32"  # the checkpoint's own dtype
    assert result["budget_of_stored_model"] == pytest.approx(
        result["budget_bytes"] / result["checkpoint_bytes"])
    table = (tmp_path / "plots" / "table.md").read_text()
    assert "| accelerate-offload |" in table and "| mmap |" in table
    assert (tmp_path / "plots" / "memory_limit.png").stat().st_size > 0


@needs_cgroup
def test_memory_limit_rows_record_the_limit_and_a_peak_within_it(store, tmp_path):
    limit = 1_500_000_000
    result = bench(store / "fj", dram_budget="50%", tokens=4, device=False,
                   memory_limit=limit, only=["predictor+window"], progress=False)
    assert result["memory_limit_bytes"] == limit
    for name, r in result["configs"].items():
        proc = r["process"]
        assert proc["limit_bytes"] == limit and proc["cgroup"] in ("v1", "v2")
        assert proc["killed"] is False and r["completed"]
        assert proc["peak_bytes"] is not None and 0 < proc["peak_bytes"] <= limit, name
        assert r["evicted_bytes"] > 0  # the store's pages dropped before the run
        assert r["runtime_bytes"] == r["max_rss_bytes"] - r["peak_dram_bytes"]


@needs_cgroup
def test_a_process_over_the_limit_is_reported_killed():
    grow = "import numpy as np; a = np.ones(400_000_000 // 8); print(a.sum())"
    run = limits.run_limited([sys.executable, "-c", grow], 200 << 20)
    assert run.killed and run.returncode != 0 and run.peak_bytes <= 200 << 20
    assert run.oom_kills >= 1
    ok = limits.run_limited([sys.executable, "-c", "print(1)"], 200 << 20,
                            stdout=subprocess.DEVNULL)
    assert ok.returncode == 0 and not ok.killed


@needs_cgroup
def test_the_page_cache_counts_against_the_limit(tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(np.random.default_rng(0).bytes(64 << 20))
    limits.evict(big)
    run = limits.run_limited(["cat", str(big)], 24 << 20, stdout=subprocess.DEVNULL)
    assert run.returncode == 0 and run.peak_bytes <= 24 << 20  # reclaimed, not killed
    assert limits.cached_bytes(big) <= 24 << 20


def test_evict_empties_the_page_cache_of_a_tree(tmp_path):
    (tmp_path / "d").mkdir()
    for i in range(3):
        (tmp_path / "d" / f"f{i}").write_bytes(b"x" * (1 << 20))
    (tmp_path / "d" / "f0").read_bytes()
    cached = limits.cached_bytes(tmp_path / "d")
    if cached is None or cached == 0:
        pytest.skip("mincore reports no cached pages on this filesystem")
    assert limits.evict(tmp_path / "d") == 3 << 20
    assert limits.cached_bytes(tmp_path / "d") == 0


def test_the_unbundled_copy_is_temporary_unless_kept(store, tmp_path):
    fj = store / "fj"
    before = set(store.iterdir())
    result = bench(fj, dram_budget="50%", tokens=3, device=False, progress=False,
                   only=["predictor+window unbundled"])
    r = result["configs"]["predictor+window unbundled"]
    assert r["flash_bytes_per_token"] > 0 and "unbundled_dir" in r["options"]
    assert not (fj / bundles.SPLIT_DIR).exists() and set(store.iterdir()) == before
    bench(fj, dram_budget="50%", tokens=3, device=False, progress=False,
          only=["predictor+window unbundled"], keep_unbundled=True)
    assert (fj / bundles.SPLIT_DIR / "complete").exists()


def test_the_median_tokens_phases_add_up_to_its_total():
    rng = np.random.default_rng(0)
    per = {p: rng.exponential(size=9) for p in ("io", "memory", "predictor", "compute")}
    parts = median_token(per)
    total = sum(per.values())
    assert sum(parts.values()) == pytest.approx(np.median(total) * 1e3)
    even = {p: v[:8] for p, v in per.items()}
    assert sum(median_token(even).values()) == pytest.approx(np.median(sum(even.values())) * 1e3)


def test_peers_argument_must_be_a_checkpoint(store, tmp_path, capsys):
    assert main(["bench", str(store / "fj"), "--peers", str(tmp_path)]) == 2
    assert "not a Hugging Face checkpoint" in capsys.readouterr().err
