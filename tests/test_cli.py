"""The command line: convert, generate --json, verify, and its error exit."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import pytest

import flashjax
from flashjax.cli import main
from flashjax.testing import synthetic_hf_checkpoint, tiny_opt_config


def test_convert_generate_verify(tmp_path, capsys):
    synthetic_hf_checkpoint(tmp_path / "hf", tiny_opt_config(), dtype="float16")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "fj"), "--dtype", "bfloat16"]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "fj"), "--prompt-ids", "2,10,11",
                 "--max-new-tokens", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    model = flashjax.load(tmp_path / "fj", progress=False)
    assert out["token_ids"] == model.generate([2, 10, 11], max_new_tokens=5)
    assert out["text"] is None  # no tokenizer in this model dir
    assert main(["verify", str(tmp_path / "fj")]) == 0
    assert "OK" in capsys.readouterr().out


def test_errors_exit_2_with_message(tmp_path, capsys):
    synthetic_hf_checkpoint(tmp_path / "hf", tiny_opt_config())
    (tmp_path / "fj").mkdir()
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "fj")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "hf"), "--prompt-ids", "2"]) == 2
    assert "run `flashjax convert` first" in capsys.readouterr().err


def test_flash_generate_reports_stats(tmp_path, capsys):
    synthetic_hf_checkpoint(tmp_path / "hf", tiny_opt_config(ffn_dim=1024), ffn_active=0.05)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "fj")]) == 0
    capsys.readouterr()
    args = ["generate", str(tmp_path / "fj"), "--prompt-ids", "2,10,11", "--max-new-tokens", "6",
            "--dram-budget", "50%", "--predictor", "oracle", "--window", "4"]
    assert main(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    dense = flashjax.load(tmp_path / "fj", progress=False)
    assert out["token_ids"] == dense.generate([2, 10, 11], max_new_tokens=6)
    stats = out["stats"]
    assert stats["peak_dram_bytes"] <= stats["dram_budget_bytes"]
    assert stats["rows_loaded"] > 0 and stats["window"] == 4 and stats["predictor"] == "oracle"
    assert len(stats["per_token"]["io_s"]) == stats["tokens"] == 3 + 6 - 1
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "per token (median)" in err and "flash bytes/token" in err


def test_generate_without_model_uses_the_shipped_one(tmp_path, monkeypatch, capsys):
    """No MODEL_DIR: the checkpoint under checkpoints/ is converted once into the cache and
    run flash-backed at half the DRAM."""
    from flashjax import shipped

    hf = tmp_path / "checkpoints" / "flashjax-docs-9m"
    synthetic_hf_checkpoint(hf, tiny_opt_config(ffn_dim=1024), ffn_active=0.05)
    monkeypatch.setattr(shipped, "PACKAGED", tmp_path / "no_package_data")
    monkeypatch.setattr(shipped, "CHECKPOINTS", tmp_path / "checkpoints")
    monkeypatch.setenv("FLASHJAX_CACHE", str(tmp_path / "cache"))
    assert main(["generate", "--prompt-ids", "2,5,6", "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 4 and out["stats"]["dram_budget_bytes"] > 0
    (converted,) = (tmp_path / "cache").glob("flashjax-docs-9m-*")
    mtime = (converted / "manifest.json").stat().st_mtime
    assert main(["generate", "--prompt-ids", "2,5,6", "--max-new-tokens", "4"]) == 0
    assert (converted / "manifest.json").stat().st_mtime == mtime  # reused, not reconverted
    assert "per token (median)" in capsys.readouterr().err


def test_shipped_model_from_the_source_tree_or_the_package(tmp_path, monkeypatch, capsys):
    """From a source tree (an editable install) the shipped model is checkpoints/'s; an
    installed wheel's package data comes first (tests/test_wheel.py installs one); with
    neither, the error names both places."""
    from flashjax import shipped

    repo_copy = Path(__file__).resolve().parent.parent / "checkpoints" / "flashjax-docs-9m"
    monkeypatch.setenv("FLASHJAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FLASHJAX_COMPILATION_CACHE", "0")  # info would turn it on
    assert shipped.shipped_checkpoint() == repo_copy
    assert main(["info"]) == 0
    converted = shipped.converted_dir(repo_copy)
    out = capsys.readouterr().out
    assert (f"shipped model        {repo_copy}\n  converted            {converted} "
            f"(converted on first use)") in out
    assert out.startswith(f"compute device       {jax.devices()[0].platform}")
    packaged = tmp_path / "_shipped"
    synthetic_hf_checkpoint(packaged / "flashjax-docs-9m", tiny_opt_config())
    monkeypatch.setattr(shipped, "PACKAGED", packaged)
    assert shipped.shipped_checkpoint() == packaged / "flashjax-docs-9m"
    with pytest.raises(ValueError, match="no shipped model named 'gpt'; the shipped models "
                                         "are opt, llama"):
        shipped.shipped_checkpoint("gpt")
    monkeypatch.setattr(shipped, "PACKAGED", tmp_path / "none")
    monkeypatch.setattr(shipped, "CHECKPOINTS", tmp_path / "none either")
    with pytest.raises(FileNotFoundError, match="none.*none either"):
        shipped.shipped_checkpoint()
    assert main(["info"]) == 0
    assert "shipped model        not available (no shipped model flashjax-docs-9m in" in \
        capsys.readouterr().out


def test_shipped_llama_by_name(tmp_path, monkeypatch, capsys):
    """--model llama runs the second shipped model (a relufied Llama with its predictors);
    naming a shipped model and a MODEL_DIR at once is refused."""
    from flashjax import shipped

    monkeypatch.setenv("FLASHJAX_CACHE", str(tmp_path / "cache"))
    assert shipped.shipped_checkpoint("llama").name == "flashjax-docs-llama-9m"
    assert main(["generate", "--model", "llama", "--prompt", "The Python interpreter",
                 "--max-new-tokens", "6", "--seed", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 6 and out["stats"]["predictor"] == "lowrank"
    (converted,) = (tmp_path / "cache").glob("flashjax-docs-llama-9m-*")
    assert json.loads((converted / "manifest.json").read_text())["config"]["model_type"] == \
        "llama"
    assert main(["generate", str(converted), "--model", "llama", "--prompt-ids", "2"]) == 2
    assert "--model llama names a shipped model" in capsys.readouterr().err


def test_info_into_a_closed_pipe_is_quiet():
    """`flashjax info | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    import subprocess

    p = subprocess.Popen([sys.executable, "-m", "flashjax", "info"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    assert p.stdout.readline()
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait() == 0 and "BrokenPipe" not in err, err
