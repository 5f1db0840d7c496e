"""SwiGLU (hidden_act silu) Llama-family models: dense parity with transformers, calibrated
activation sparsity (``flashjax calibrate``) through the dense and flash paths, and the
relufication recipe's checkpoint (``scripts/relufy.py``) against transformers.

Tolerances as in test_llama: float32 teacher-forced logits rel L2 <= 1e-4 against
transformers. Flash against dense of the same (thresholded) model: <= 1e-5, the rounding of
computing the FFN over a subset of rows in another order.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import flashjax
from flashjax.config import ConfigError, ModelConfig
from flashjax.predictor.calibrate import calibrate
from flashjax.predictor.collect import ffn_activations
from flashjax.predictor.text import sequences
from flashjax.testing import random_hf_checkpoint, tiny_llama_config
from tests.test_parity import hf_greedy, hf_logits, max_token_kl, prompts, rel_err
from tests.test_predictor import _text, save_word_tokenizer

LLAMA_SPECIAL = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0-3 as tiny_llama_config numbers them
VOCAB = 300  # the word tokenizer's
SWIGLU = {
    "llama": tiny_llama_config(hidden_act="silu", vocab_size=VOCAB, hidden_size=64,
                               intermediate_size=1024, num_hidden_layers=3),
    "qwen2": tiny_llama_config("qwen2", hidden_act="silu", vocab_size=VOCAB, hidden_size=48,
                               num_attention_heads=6, num_key_value_heads=2,
                               tie_word_embeddings=True),
}


@pytest.fixture(scope="module")
def swiglu(tmp_path_factory):
    """swiglu(variant) -> (root with hf/, fj/ and text.txt, transformers reference)."""
    made = {}

    def get(variant):
        if variant not in made:
            root = tmp_path_factory.mktemp(f"swiglu_{variant}")
            ref = random_hf_checkpoint(root / "hf", SWIGLU[variant], seed=3)
            save_word_tokenizer(root / "hf", LLAMA_SPECIAL)
            flashjax.convert(root / "hf", root / "fj", progress=False)
            (root / "text.txt").write_text("\n\n".join(_text(300, 4)))
            made[variant] = (root, ref)
        return made[variant]

    return get


def _calibrated(root: Path, sparsity: float, tag: str) -> Path:
    """A copy of the store calibrated to ``sparsity`` on the fixture's text."""
    import shutil

    out = root / f"fj_{tag}"
    if not out.exists():
        shutil.copytree(root / "fj", out)
        calibrate(out, root / "text.txt", sparsity=sparsity, tokens=4096, seq_len=64,
                  progress=False)
    return out


@pytest.mark.parametrize("variant", sorted(SWIGLU))
def test_dense_swiglu_matches_transformers(swiglu, variant):
    root, ref = swiglu(variant)
    model = flashjax.load(root / "fj", progress=False)
    assert model.cfg.activation == "silu" and model.cfg.activation_thresholds is None
    ids = prompts(VOCAB, seed=5, length=40)
    ours, want = model.logits(ids), hf_logits(ref, ids)
    assert rel_err(ours, want) <= 1e-4
    assert max_token_kl(ours, want) <= 1e-6
    prompt = ids[0, :12].tolist()
    assert model.generate(prompt, max_new_tokens=16, stop_at_eos=False) == \
        hf_greedy(ref, prompt, 16)


def test_uncalibrated_flash_reads_every_row_and_equals_dense(swiglu, caplog):
    root, ref = swiglu("llama")
    dense = flashjax.load(root / "fj", progress=False)
    with caplog.at_level("WARNING"):
        flash = flashjax.load(root / "fj", dram_budget=0.5, predictor="oracle", max_context=64)
    assert "without calibrated thresholds" in caplog.text
    prompt = prompts(VOCAB, seed=7, batch=1, length=10)[0].tolist()
    got, stats = flash.generate(prompt, max_new_tokens=8, stop_at_eos=False, return_stats=True)
    assert got == dense.generate(prompt, max_new_tokens=8, stop_at_eos=False)
    cfg = flash.cfg  # every neuron of every layer for each token fed (prompt, then 7 new)
    assert stats["rows_needed"] == (len(prompt) + 7) * cfg.num_hidden_layers * cfg.ffn_dim


def test_sparsity_zero_is_exact(swiglu):
    """Thresholds of 0 skip only exact zeros: dense and flash give transformers' tokens."""
    root, ref = swiglu("llama")
    model_dir = _calibrated(root, 0.0, "s0")
    cfg = flashjax.load(model_dir, progress=False).cfg
    assert cfg.activation_thresholds == (0.0,) * cfg.num_hidden_layers
    dense = flashjax.load(model_dir, progress=False)
    flash = flashjax.load(model_dir, dram_budget=0.5, predictor="oracle", max_context=64)
    ids = prompts(VOCAB, seed=8, batch=1, length=20)
    assert rel_err(dense.logits(ids), hf_logits(ref, ids)) <= 1e-4
    assert rel_err(flash.logits(ids), dense.logits(ids)) <= 1e-5
    prompt = ids[0, :10].tolist()
    want = hf_greedy(ref, prompt, 12)
    assert dense.generate(prompt, max_new_tokens=12, stop_at_eos=False) == want
    assert flash.generate(prompt, max_new_tokens=12, stop_at_eos=False) == want


def _measured_sparsity(model, text: Path, seq_len: int, tokens: int) -> np.ndarray:
    """Per layer, the fraction of neurons that do not fire, from ``collect``'s activity bits
    (an independent path from calibrate's own measurement)."""
    cfg = model.cfg
    seqs = np.stack(list(sequences(text, model.tokenizer, seq_len=seq_len,
                                   bos_id=cfg.bos_token_id, eos_id=cfg.eos_token_id,
                                   max_tokens=tokens)))
    _, bits, _ = ffn_activations(cfg, model.params, jnp.asarray(seqs))
    active = np.unpackbits(np.asarray(bits), axis=-1, count=cfg.ffn_dim, bitorder="little")
    return 1 - active.reshape(cfg.num_hidden_layers, -1).mean(axis=1)


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.65])
def test_thresholds_reproduce_the_requested_sparsity(swiglu, sparsity):
    root, _ = swiglu("llama")
    model_dir = _calibrated(root, sparsity, f"s{int(100 * sparsity)}")
    record = json.loads((model_dir / "calibration.json").read_text())
    model = flashjax.load(model_dir, progress=False)
    thresholds = model.cfg.activation_thresholds
    assert thresholds is not None and all(t > 0 for t in thresholds)
    assert record["thresholds"] == list(thresholds)
    measured = _measured_sparsity(model, root / "text.txt", 64, 4096)
    assert np.abs(measured - sparsity).max() <= 0.02, measured
    assert np.allclose(measured, record["measured_sparsity"], atol=1e-3)


def test_calibrated_ffn_is_the_thresholded_swiglu(swiglu):
    """The dense path's FFN is silu(gate) zeroed at or below the threshold, times up, down:
    checked against numpy on one layer's input."""
    from flashjax.model.llama import GatedFFN

    root, _ = swiglu("llama")
    model = flashjax.load(_calibrated(root, 0.5, "s50"), progress=False)
    cfg, t = model.cfg, model.cfg.activation_thresholds[1]
    assert len(set(model.cfg.activation_thresholds)) > 1  # each layer its own
    p = model.params["layers_1"]["ffn"]
    x = np.random.default_rng(0).standard_normal((1, 5, cfg.hidden_size)).astype(np.float32)
    ours, scores = GatedFFN(cfg, 1).apply({"params": p}, x, method="activity")
    gate = x @ np.asarray(p["gate"]["kernel"])
    act = gate / (1 + np.exp(-gate))
    act = np.where(np.abs(act) > t, act, 0)
    want = (act * (x @ np.asarray(p["up"]["kernel"]))) @ np.asarray(p["down"]["kernel"])
    assert rel_err(np.asarray(ours), want) <= 1e-5
    assert ((np.asarray(scores) > 0) == (act != 0)).all()
    assert 0.3 < (act == 0).mean() < 0.7


def test_calibrated_flash_equals_calibrated_dense(swiglu):
    root, _ = swiglu("llama")
    model_dir = _calibrated(root, 0.5, "s50")
    dense = flashjax.load(model_dir, progress=False)
    flash = flashjax.load(model_dir, dram_budget=0.4, predictor="oracle", max_context=64,
                          window=2)
    prompt = prompts(VOCAB, seed=9, batch=1, length=10)[0].tolist()
    want = dense.generate(prompt, max_new_tokens=12, stop_at_eos=False)
    got, stats = flash.generate(prompt, max_new_tokens=12, stop_at_eos=False,
                                return_stats=True)
    assert got == want
    cfg = flash.cfg
    needed = stats["rows_needed"] / ((len(prompt) + 11) * cfg.num_hidden_layers * cfg.ffn_dim)
    assert 0.3 < needed < 0.7  # about half the rows: the calibrated sparsity
    ids = prompts(VOCAB, seed=10, batch=1, length=20)
    assert rel_err(flash.logits(ids), dense.logits(ids)) <= 1e-5
    uncalibrated = flashjax.load(root / "fj", progress=False)
    assert rel_err(dense.logits(ids), uncalibrated.logits(ids)) > 1e-3  # it does change them


def test_calibrate_refuses_what_it_cannot_do(swiglu, tmp_path):
    import shutil

    root, _ = swiglu("llama")
    with pytest.raises(ValueError, match=r"sparsity must be a fraction in \[0, 1\)"):
        calibrate(root / "fj", root / "text.txt", sparsity=1.0, progress=False)
    copy = tmp_path / "fj"
    shutil.copytree(root / "fj", copy)
    (copy / "predictors").mkdir()
    before = (copy / "manifest.json").read_text()
    with pytest.raises(FileExistsError, match="--force"):
        calibrate(copy, root / "text.txt", sparsity=0.5, progress=False)
    assert (copy / "manifest.json").read_text() == before  # nothing changed
    relu = tmp_path / "relu"
    random_hf_checkpoint(relu / "hf", tiny_llama_config())
    flashjax.convert(relu / "hf", relu / "fj", progress=False)
    with pytest.raises(ValueError, match="calibration is for SiLU"):
        calibrate(relu / "fj", root / "text.txt", sparsity=0.5, progress=False)


def test_threshold_fields_are_checked():
    base = tiny_llama_config(hidden_act="silu")
    with pytest.raises(ConfigError, match="one finite threshold >= 0 per layer"):
        ModelConfig.from_hf_config(base | {"activation_thresholds": [0.1]})
    with pytest.raises(ConfigError, match="activation_thresholds"):
        ModelConfig.from_hf_config(base | {"activation_thresholds": "0.1"})
    with pytest.raises(ConfigError, match="is for SiLU"):
        ModelConfig.from_hf_config(tiny_llama_config() | {"activation_thresholds": [0.1, 0.2]})
    cfg = ModelConfig.from_hf_config(base | {"activation_thresholds": [0.1, 0.2]})
    assert cfg.activation_thresholds == (0.1, 0.2)
    assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg


def test_calibrate_cli(swiglu, tmp_path, capsys):
    import shutil

    from flashjax.cli import main

    root, _ = swiglu("qwen2")
    shutil.copytree(root / "fj", tmp_path / "fj")
    assert main(["calibrate", str(tmp_path / "fj"), "--text", str(root / "text.txt"),
                 "--sparsity", "0.4", "--tokens", "2048", "--seq-len", "64"]) == 0
    err = capsys.readouterr().err
    assert "skips" in err and "per layer" in err
    record = json.loads((tmp_path / "fj" / "calibration.json").read_text())
    assert abs(record["measured_mean"] - 0.4) <= 0.02


def _relufy_module():
    scripts = str(Path(__file__).resolve().parent.parent / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    import relufy

    return relufy


def test_relufied_checkpoint_loads_in_transformers_with_the_same_logits(swiglu, tmp_path):
    """A few relufy steps on the tiny SwiGLU model: the Hugging Face checkpoint it writes
    says hidden_act relu, transformers computes it with ReLU, and flashjax's logits of the
    converted checkpoint equal transformers'."""
    import transformers

    root, _ = swiglu("llama")
    out = tmp_path / "relu"
    _relufy_module().main([str(root / "hf"), "--text", str(root / "text.txt"), "--out", str(out),
                           "--steps", "6", "--batch", "4", "--seq-len", "32", "--warmup", "2",
                           "--eval-every", "3", "--eval-windows", "4", "--ckpt-every", "3",
                           "--log-every", "1"])
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_act"] == "relu"
    log = json.loads((out / "relufy_log.json").read_text())
    assert log["steps_done"] == 6 and (out / "relufy_curves.png").stat().st_size > 0
    assert 0 < log["final"]["sparsity"] < 1
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32,
                                                            attn_implementation="eager")
    assert ref.config.hidden_act == "relu"
    flashjax.convert(out, tmp_path / "fj", dtype="float32", progress=False)
    model = flashjax.load(tmp_path / "fj", progress=False)
    assert model.cfg.activation == "relu"
    ids = prompts(VOCAB, seed=11, length=30)
    assert rel_err(model.logits(ids), hf_logits(ref, ids)) <= 1e-4
    # the relufied FFN is exactly sparse: oracle flash tokens equal dense
    flash = flashjax.load(tmp_path / "fj", dram_budget=0.5, predictor="oracle", max_context=64)
    prompt = ids[0, :10].tolist()
    assert flash.generate(prompt, max_new_tokens=10, stop_at_eos=False) == \
        model.generate(prompt, max_new_tokens=10, stop_at_eos=False)


def test_relufy_resumes_from_its_checkpoints(swiglu, tmp_path):
    root, _ = swiglu("llama")
    relufy = _relufy_module()
    args = [str(root / "hf"), "--text", str(root / "text.txt"), "--out", str(tmp_path / "a"),
            "--batch", "2", "--seq-len", "32", "--warmup", "1", "--eval-every", "100",
            "--eval-windows", "2", "--ckpt-every", "2", "--log-every", "1",
            "--work-dir", str(tmp_path / "work")]
    relufy.main(args + ["--steps", "4", "--max-minutes", "0"])  # stops at once, saves step 0
    relufy.main(args + ["--steps", "4"])
    log = json.loads((tmp_path / "a" / "relufy_log.json").read_text())
    assert log["steps_done"] == 4 and len(log["commands"]) == 2
    relufy.main([*args[:4], str(tmp_path / "b"), *args[5:], "--steps", "4",
                 "--work-dir", str(tmp_path / "work_b")])
    a = flashjax.load(_convert(tmp_path / "a", tmp_path / "fa"), progress=False)
    b = flashjax.load(_convert(tmp_path / "b", tmp_path / "fb"), progress=False)
    ids = prompts(VOCAB, seed=12, length=16)
    assert np.array_equal(a.logits(ids), b.logits(ids))  # resumed == uninterrupted


def _convert(hf_dir, out):
    flashjax.convert(hf_dir, out, progress=False)
    return out
