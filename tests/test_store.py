"""The flash store's layout: bundle rows, their byte positions, checksums, sharded inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorstore as ts
from safetensors.numpy import load_file

import flashjax
from flashjax.store import bundles
from flashjax.store.manifest import Manifest
from flashjax.testing import synthetic_hf_checkpoint, tiny_opt_config


@pytest.mark.parametrize("variant", ["pre_ln", "odd"])
def test_bundle_rows_are_up_column_then_down_row(converted, variant):
    c = converted(variant)
    hf = load_file(str(c.hf_dir / "model.safetensors"))
    manifest = Manifest.read(c.model_dir)
    d = manifest.config.hidden_size
    for layer in range(manifest.config.num_hidden_layers):
        w_up = hf[f"model.decoder.layers.{layer}.fc1.weight"].T  # [D, N]
        w_down = hf[f"model.decoder.layers.{layer}.fc2.weight"].T  # [N, D]
        store = ts.open({"driver": "zarr3", "kvstore": {
            "driver": "file", "path": str(c.model_dir / "ffn" / f"layer_{layer:03d}")}}).result()
        assert tuple(store.shape) == (manifest.config.ffn_dim, 2 * d)
        for i in (0, 1, 17, manifest.config.ffn_dim - 1):
            row = store[i].read().result()
            np.testing.assert_array_equal(row, np.concatenate([w_up[:, i], w_down[i, :]]))


def test_each_neuron_is_one_contiguous_byte_range(converted):
    """Row i sits at byte offset i * row_bytes of its layer's single shard file."""
    c = converted("pre_ln", "float16")
    manifest = Manifest.read(c.model_dir)
    cfg, row_bytes = manifest.config, manifest.row_bytes
    shards = list((c.model_dir / "ffn" / "layer_000").rglob("c/*/*"))
    assert len(shards) == 1  # one shard file per layer
    raw = shards[0].read_bytes()
    # data, then a 16-byte (offset, length) entry per row, then the index's crc32c
    assert len(raw) == cfg.ffn_dim * row_bytes + cfg.ffn_dim * 16 + 4
    index = np.frombuffer(raw[cfg.ffn_dim * row_bytes:-4], "<u8").reshape(-1, 2)
    np.testing.assert_array_equal(index[:, 0], np.arange(cfg.ffn_dim) * row_bytes)
    np.testing.assert_array_equal(index[:, 1], row_bytes)
    all_rows = bundles.read_layer(c.model_dir, 0)
    i = 37
    np.testing.assert_array_equal(
        np.frombuffer(raw[i * row_bytes:(i + 1) * row_bytes], np.float16), all_rows[i])


def test_manifest_records_sizes_and_layout(converted):
    c = converted("post_ln_proj", "bfloat16")
    d = json.loads((c.model_dir / "manifest.json").read_text())
    cfg = tiny_opt_config(do_layer_norm_before=False, word_embed_proj_dim=16)
    assert d["format"] == "flashjax" and d["format_version"] == 2 and d["dtype"] == "bfloat16"
    assert d["layout"]["ffn"]["row_bytes"] == 2 * cfg["hidden_size"] * 2
    assert d["sizes"]["ffn_bytes"] == cfg["num_hidden_layers"] * cfg["ffn_dim"] * 4 * cfg["hidden_size"]
    assert d["config"]["word_embed_proj_dim"] == 16 and d["config"]["do_layer_norm_before"] is False
    assert d["sizes"]["total_bytes"] == d["sizes"]["dram_bytes"] + d["sizes"]["ffn_bytes"]


def test_sharded_and_single_file_checkpoints_convert_alike(tmp_path):
    cfg = tiny_opt_config(num_hidden_layers=3)
    synthetic_hf_checkpoint(tmp_path / "one", cfg, seed=5)
    synthetic_hf_checkpoint(tmp_path / "many", cfg, seed=5, shard_layers=1)
    assert len(list((tmp_path / "many").glob("model-*.safetensors"))) == 3
    flashjax.convert(tmp_path / "one", tmp_path / "a", progress=False)
    flashjax.convert(tmp_path / "many", tmp_path / "b", progress=False)
    ids = [2, 10, 20, 30, 40]
    np.testing.assert_array_equal(flashjax.load(tmp_path / "a", progress=False).logits(ids),
                                  flashjax.load(tmp_path / "b", progress=False).logits(ids))


def test_tokenizer_files_are_carried(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

    synthetic_hf_checkpoint(tmp_path / "hf", tiny_opt_config(vocab_size=300))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the cat sat on the mat"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    flashjax.convert(tmp_path / "hf", tmp_path / "fj", progress=False)
    model = flashjax.load(tmp_path / "fj", progress=False)
    ids = model.encode("the cat")
    assert ids[0] == 2 and model.decode(ids) == "the cat"
    assert len(model.generate(ids, max_new_tokens=4, stop_at_eos=False)) == 4
