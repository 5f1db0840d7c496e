"""No silent wrong output: checked flash reads, arguments refused with their names, limits that
match dense mode, clean interrupts, damage found or harmless (fault injection)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import flashjax
from flashjax.cli import main
from flashjax.store import bundles
from flashjax.testing import synthetic_hf_checkpoint, synthetic_store, tiny_opt_config

CFG = tiny_opt_config(hidden_size=64, ffn_dim=1024, num_hidden_layers=2,
                      max_position_embeddings=256)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("rel"), CFG, seed=4, ffn_active=0.1)


def _copy(store, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(store, out)
    return out


def _flip(path, offset: int, bit: int = 0) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 1 << bit
    path.write_bytes(bytes(raw))


def _shard(model_dir, layer: int):
    return model_dir / "ffn" / bundles.layer_key(layer) / "c" / "0" / "0"


def cli_error(capsys, argv) -> str:
    """Run the CLI expecting a refusal; returns its stderr."""
    with pytest.raises(SystemExit) as e:
        code = main(argv)
        raise SystemExit(code)
    assert e.value.code not in (0, None)
    return capsys.readouterr().err


# -- checked reads ---------------------------------------------------------------------------


@pytest.mark.parametrize("predictor", ["none", "oracle"])
def test_flipped_bit_in_a_shard_is_an_error_naming_layer_neuron_and_file(store, tmp_path,
                                                                         capsys, predictor):
    damaged = _copy(store, tmp_path)
    row_bytes = 2 * 64 * 2
    _flip(_shard(damaged, 1), 37 * row_bytes + 5, bit=3)  # neuron 37 of layer 1
    err = cli_error(capsys, ["generate", str(damaged), "--prompt-ids", "2,10,20",
                             "--max-new-tokens", "4", "--dram-budget", "60%",
                             "--predictor", predictor])
    assert "crc32c mismatch" in err and "neurons 37" in err and "ffn/layer_001" in err
    # opting out is possible, and says what it gives up in --help
    assert main(["generate", str(damaged), "--prompt-ids", "2,10,20", "--max-new-tokens", "2",
                 "--dram-budget", "60%", "--predictor", "none", "--no-verify-reads"]) == 0


def test_deleted_shard_is_an_error_naming_the_file(store, tmp_path, capsys):
    damaged = _copy(store, tmp_path)
    _shard(damaged, 0).unlink()
    err = cli_error(capsys, ["generate", str(damaged), "--prompt-ids", "2,10",
                             "--max-new-tokens", "2", "--dram-budget", "60%",
                             "--predictor", "none"])
    assert f"{_shard(damaged, 0)}: the shard file" in err and "is missing" in err


# -- arguments -------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,message", [
    (["generate", "M", "--dram-budget", "1.5"], "argument --dram-budget: dram_budget 1.5: a "
     "fraction must be in (0, 1] (bytes need a unit or an integer >= 1024)"),
    (["generate", "M", "--dram-budget", "100"], "a byte count must be >= 1024"),
    (["generate", "M", "--max-new-tokens", "0"], "argument --max-new-tokens: 0 must be >= 1"),
    (["generate", "M", "--top-p", "0"], "argument --top-p: 0 must be > 0"),
    (["generate", "M", "--prompt-ids", "1,-2"], "argument --prompt-ids: expected integers >= 0"),
    (["generate", "M", "--prompt", "caf\udce9"], "argument --prompt: is not valid UTF-8 text"),
    (["generate", "M", "--window", "0"], "argument --window: 0 must be >= 1"),
    (["train-predictors", "M", "--data", "D", "--target-recall", "1.5"],
     "argument --target-recall: 1.5 must be <= 1"),
    (["train-predictors", "M", "--data", "D", "--target-recall", "0"],
     "argument --target-recall: 0 must be > 0"),
    (["train-predictors", "M", "--data", "D", "--steps", "0"], "argument --steps: 0 must be >= 1"),
    (["collect", "M", "--text", "T", "--out", "O", "--batch", "0"],
     "argument --batch: 0 must be >= 1"),
    (["collect", "M", "--text", "T", "--out", "O", "--seq-len", "1"],
     "argument --seq-len: 1 must be >= 2"),
    (["bench", "M", "--windows", "1,0"], "argument --windows: window sizes must be >= 1"),
])
def test_arguments_are_refused_with_their_names(capsys, argv, message):
    """Refused while parsing: before any file is read (M, D, T do not exist)."""
    assert message in cli_error(capsys, argv)


def test_out_of_vocabulary_prompt_ids_before_loading(store, capsys):
    err = cli_error(capsys, ["generate", str(store), "--prompt-ids", str(2 ** 70)])
    assert f"token id {2 ** 70} is outside the model's vocabulary [0, 96)" in err


def test_flash_mode_accepts_what_dense_mode_accepts(store, capsys):
    """A 3-token prompt + 250 new tokens fits 256 positions: both modes run it, with the same
    tokens; one more token is refused before loading, naming the limit."""
    argv = ["generate", str(store), "--prompt-ids", "2,10,20", "--max-new-tokens", "250",
            "--json"]
    assert main(argv) == 0
    dense = json.loads(capsys.readouterr().out)["token_ids"]
    assert main(argv + ["--dram-budget", "60%", "--predictor", "oracle"]) == 0
    flash = json.loads(capsys.readouterr().out)
    assert flash["token_ids"] == dense and len(dense) == 250
    err = cli_error(capsys, ["generate", str(store), "--prompt-ids", "2,10,20",
                             "--max-new-tokens", "254", "--dram-budget", "60%"])
    assert "exceed the model's max_position_embeddings 256" in err
    err = cli_error(capsys, argv + ["--dram-budget", "60%", "--max-context", "100"])
    assert "--max-context 100 is less than" in err


def test_api_slots_never_exceed_max_context(store):
    """The KV cache is rounded up to bound recompiles, but never past max_context when the
    sequence itself fits."""
    flash = flashjax.load(store, dram_budget=0.6, predictor="oracle", max_context=70)
    dense = flashjax.load(store, progress=False)
    prompt = list(range(3, 13))
    assert flash.generate(prompt, 61, stop_at_eos=False) == \
        dense.generate(prompt, 61, stop_at_eos=False)
    with pytest.raises(ValueError, match="max_context 70"):
        flash.generate(prompt, 62, stop_at_eos=False)


# -- collection and training ----------------------------------------------------------------


def test_training_on_an_incomplete_collection_warns_with_the_counts(tmp_path, caplog):
    from flashjax.predictor.collect import META, collect
    from flashjax.predictor.train import train_predictors
    from tests.test_predictor import _text, save_word_tokenizer

    cfg = tiny_opt_config(vocab_size=300, hidden_size=64, ffn_dim=512, num_hidden_layers=2)
    synthetic_hf_checkpoint(tmp_path / "hf", cfg, ffn_active=0.06)
    save_word_tokenizer(tmp_path / "hf", n_docs=100)
    flashjax.convert(tmp_path / "hf", tmp_path / "fj", progress=False)
    (tmp_path / "t.txt").write_text("\n\n".join(_text(200, 1)))
    model = flashjax.load(tmp_path / "fj", progress=False)
    (tmp_path / "short.txt").write_text(_text(3, 2)[0])
    with pytest.raises(ValueError, match="not one batch of 8 sequences of 128 tokens"):
        collect(model, tmp_path / "short.txt", tmp_path / "none", tokens=100, seq_len=128,
                batch=8, progress=False)
    collect(model, tmp_path / "t.txt", tmp_path / "acts", tokens=1024, seq_len=64, batch=4,
            progress=False)
    # as a collection stopped after its first batches leaves it
    meta_file = tmp_path / "acts" / META
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "complete": False, "tokens_written": 256}))
    with caplog.at_level("WARNING"):
        train_predictors(tmp_path / "fj", tmp_path / "acts", steps=5, batch=64, progress=False)
    assert "the collection is incomplete (256 of 1024 tokens" in caplog.text


# -- interrupts ------------------------------------------------------------------------------


def _interrupt_when(argv, ready, timeout=120.0):
    """Run the CLI in a subprocess, SIGINT it once ``ready()``; returns (rc, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "flashjax.cli", *argv],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not ready(proc) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def test_ctrl_c_during_convert_leaves_nothing_and_prints_one_line(tmp_path):
    cfg = tiny_opt_config(hidden_size=256, ffn_dim=4096, num_hidden_layers=8)
    synthetic_hf_checkpoint(tmp_path / "hf", cfg, shard_layers=1)
    out = tmp_path / "out"
    # interrupted once a few layers have been written into the partial directory
    rc, err = _interrupt_when(
        ["convert", str(tmp_path / "hf"), str(out)],
        lambda proc: len(list(tmp_path.glob(".out.partial-*/ffn/layer_00[2-9]"))) > 0)
    assert rc == 130, err
    assert "Traceback" not in err and "interrupted; nothing was written" in err
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_ctrl_c_during_generate(store):
    def generating(proc):  # the reader has the store's shards open: tokens are being made
        try:
            fds = os.listdir(f"/proc/{proc.pid}/fd")
            return any(os.readlink(f"/proc/{proc.pid}/fd/{fd}").startswith(str(store / "ffn"))
                       for fd in fds)
        except OSError:
            return False

    rc, err = _interrupt_when(["generate", str(store), "--prompt-ids", "2,10",
                               "--max-new-tokens", "250", "--dram-budget", "60%",
                               "--predictor", "none"], generating)
    assert rc == 130 and "Traceback" not in err and err.strip().endswith("interrupted")


# -- fault injection -------------------------------------------------------------------------


def test_random_damage_is_found_or_harmless(store, tmp_path):
    """20 trials: one random bit flipped in a random shard file or DRAM checkpoint file.
    Dense and flash runs either raise an error naming the damage, or give the clean tokens;
    never other tokens."""
    prompt = [2, 10, 20, 30]
    clean_dense = flashjax.load(store, progress=False).generate(prompt, 6, stop_at_eos=False)
    rng = np.random.default_rng(0)
    files = sorted([p for p in (store / "ffn").rglob("*") if p.is_file()]
                   + [p for p in (store / "dram").rglob("*") if p.is_file()])
    outcomes = {"error": 0, "clean": 0}
    for trial in range(20):
        damaged = tmp_path / f"t{trial}"
        shutil.copytree(store, damaged)
        target = damaged / files[rng.integers(len(files))].relative_to(store)
        size = target.stat().st_size
        if size == 0:
            continue
        _flip(target, int(rng.integers(size)), int(rng.integers(8)))
        for mode in ({}, {"dram_budget": 0.6, "predictor": "oracle"},
                     {"dram_budget": 0.6, "predictor": "naive"}):
            try:
                got = flashjax.load(damaged, progress=False, **mode).generate(
                    prompt, 6, stop_at_eos=False)
            except (flashjax.StoreError, flashjax.ConfigError, ValueError) as e:
                assert str(damaged) in str(e), (target, e)
                outcomes["error"] += 1
                continue
            assert got == clean_dense, (target, mode)
            outcomes["clean"] += 1
        shutil.rmtree(damaged)
    assert outcomes["error"] > 0


def test_info_gives_the_minimum_budget_that_loads(store, capsys):
    """``flashjax info`` names the store's shape and sizes, and a minimum budget that loads
    while one byte less is refused."""
    assert main(["info", str(store)]) == 0
    out = capsys.readouterr().out
    assert "opt: 2 layers, width 64" in out and "1024 FFN neurons (fc1/fc2, relu)" in out
    assert "(crc32c-checked)" in out and "predictors           none" in out
    low = int(out.split("minimum budget")[1].split("bytes")[0].replace(",", ""))
    flashjax.load(store, dram_budget=low, predictor="hybrid")
    with pytest.raises(ValueError, match="below the minimum"):
        flashjax.load(store, dram_budget=low - 1, predictor="hybrid")
