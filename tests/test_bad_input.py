"""Bad input gives an error that names the problem and leaves nothing half-written."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import flashjax
from flashjax import CheckpointError, ConfigError, StoreError
from flashjax.store import bundles
from flashjax.testing import synthetic_hf_checkpoint, tiny_opt_config

FC1 = "model.decoder.layers.1.fc1.weight"


@pytest.fixture
def hf(tmp_path):
    return synthetic_hf_checkpoint(tmp_path / "hf", tiny_opt_config(), dtype="float32")


def _edit(hf, fn):
    tensors = load_file(str(hf / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(hf / "model.safetensors"))


def _nothing_written(tmp_path):
    return not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_missing_tensor(hf, tmp_path):
    _edit(hf, lambda t: t.pop(FC1))
    with pytest.raises(CheckpointError, match=f"tensor '{FC1}' is missing"):
        flashjax.convert(hf, tmp_path / "out")
    assert _nothing_written(tmp_path)


def test_wrong_shape(hf, tmp_path):
    _edit(hf, lambda t: t.update({FC1: t[FC1][:100]}))
    with pytest.raises(CheckpointError, match=rf"'{FC1}' has shape \(100, 32\), expected \(128, 32\)"):
        flashjax.convert(hf, tmp_path / "out")
    assert _nothing_written(tmp_path)


def test_unsupported_activation(hf, tmp_path):
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**cfg, "activation_function": "gelu"}))
    with pytest.raises(ConfigError, match="'activation_function' is 'gelu'.*'relu'"):
        flashjax.convert(hf, tmp_path / "out")
    assert _nothing_written(tmp_path)


def test_unknown_family(hf, tmp_path):
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="'model_type' is 'gpt2'; flashjax supports"):
        flashjax.convert(hf, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_opt_tensors_under_a_llama_config(hf, tmp_path):
    """An OPT checkpoint whose config claims to be a ReLU Llama: the tensors do not match."""
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(
        {**cfg, "model_type": "llama", "hidden_act": "relu", "intermediate_size": cfg["ffn_dim"]}))
    with pytest.raises(CheckpointError, match="'model.embed_tokens.weight'"):
        flashjax.convert(hf, tmp_path / "out")


def test_existing_output_is_left_alone(hf, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="already exists"):
        flashjax.convert(hf, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"


def test_interrupted_conversion_leaves_nothing(hf, tmp_path, monkeypatch):
    real = bundles.create_layer

    def fail_on_second_layer(model_dir, layer, rows, context):
        if layer == 1:
            raise KeyboardInterrupt
        real(model_dir, layer, rows, context)

    monkeypatch.setattr(bundles, "create_layer", fail_on_second_layer)
    with pytest.raises(KeyboardInterrupt):
        flashjax.convert(hf, tmp_path / "out")
    assert _nothing_written(tmp_path)


def test_directory_without_manifest_does_not_load(hf, tmp_path):
    with pytest.raises(StoreError, match="not a flashjax model.*flashjax convert"):
        flashjax.load(hf)


@pytest.fixture
def converted_dir(hf, tmp_path):
    flashjax.convert(hf, tmp_path / "fj", progress=False)
    return tmp_path / "fj"


def _shard(model_dir, layer=1):
    (path,) = (model_dir / "ffn" / f"layer_{layer:03d}").rglob("c/*/*")
    return path


def test_truncated_bundle_file(converted_dir):
    shard = _shard(converted_dir)
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(StoreError, match="layer_001"):
        flashjax.load(converted_dir, progress=False)


def test_bit_flipped_bundle_row(converted_dir):
    shard = _shard(converted_dir)
    raw = bytearray(shard.read_bytes())
    row_bytes = 2 * 32 * 4
    raw[5 * row_bytes + 3] ^= 0x10  # one bit of neuron 5
    shard.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"layer_001: crc32c mismatch in 1 row\(s\) \(neurons 5\)"):
        flashjax.load(converted_dir, progress=False)
    with pytest.raises(StoreError, match="neurons 5"):
        from flashjax.store.verify import verify
        verify(converted_dir)


def test_bit_flipped_shard_index(converted_dir):
    shard = _shard(converted_dir)
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0x01  # inside the shard index, covered by its crc32c
    shard.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="layer_001"):
        flashjax.load(converted_dir, progress=False)


def test_out_of_range_token_ids(converted_dir):
    model = flashjax.load(converted_dir, progress=False)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 96\); found 3..500"):
        model.generate([3, 500])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(list(range(3, 90)), max_new_tokens=100)
    assert np.isfinite(model.logits([3, 4])).all()
