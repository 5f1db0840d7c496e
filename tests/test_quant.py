"""Quantized bundle rows (int8, int4): round-trip bounds, flash == dense of the same
dequantized weights, checksums over the quantized bytes, budgets and the command line."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

import flashjax
from flashjax import StoreError
from flashjax.budget import dense_bytes
from flashjax.cli import main
from flashjax.config import ModelConfig
from flashjax.store import bundles, quant
from flashjax.store.manifest import Manifest
from flashjax.store.export import export_model_dir
from flashjax.store.reader import shard_row_offsets
from flashjax.store.verify import verify
from flashjax.testing import random_hf_checkpoint, synthetic_store, tiny_llama_config, \
    tiny_opt_config
from tests.test_predictor import llama_with_activations

PROMPT = [2, 11, 25, 37, 48, 59, 60, 71]
LAYOUTS = [("int8", "row"), ("int8", "dram"), ("int4", "row"), ("int4", "dram")]
SPARSE = tiny_opt_config(hidden_size=64, ffn_dim=1024, num_hidden_layers=3)


def _rows(n=40, width=256, seed=0):
    rng = np.random.default_rng(seed)
    v = rng.normal(0, 0.02, (n, width)).astype(np.float32)
    v[0] = 0  # an all-zero row: its groups keep q = 0
    v[1, :64] *= 50  # an outlier group
    return v


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("scales", quant.SCALE_PLACES)
def test_round_trip_is_within_half_a_step_per_group(bits, scales):
    """Round to nearest: every value comes back within half its group's scale, numpy and jax
    decode alike, and the stored bytes are what the layout says."""
    q = quant.Quant(bits=bits, group=64, width=256, scales=scales)
    v = _rows()
    rows, s = quant.encode(v, q)
    assert rows.dtype == np.uint8 and rows.shape == (len(v), q.row_bytes)
    assert q.row_bytes == -(-(256 * bits // 8 + (8 if scales == "row" else 0)) // 16) * 16
    back = quant.decode(rows, q, s)
    step = np.repeat(s.astype(np.float32), 64, axis=1)
    assert np.all(np.abs(back - v) <= step / 2 * (1 + 1e-6))
    assert np.all(back[0] == 0)
    top = np.abs(v.reshape(len(v), 4, 64)).max(-1)  # the group's largest magnitude survives
    assert np.allclose(np.abs(back.reshape(len(v), 4, 64)).max(-1), top, rtol=2e-3)
    jax_back = jax.jit(lambda r, s: quant.decode_jax(r, q, s))(
        rows, s if scales == "dram" else None)
    np.testing.assert_array_equal(np.asarray(jax_back), back)


def test_int4_nibble_order():
    """Byte j: value j in the low nibble, value j + width/2 in the high one, as q + 8."""
    q = quant.Quant(bits=4, group=2, width=4, scales="dram")
    ints = np.array([[-8, 7, 0, -1]], np.int8)
    rows = quant.pack(ints, q, np.ones((1, 2), np.float16))
    assert rows[0, :2].tolist() == [(-8 + 8) | ((0 + 8) << 4), (7 + 8) | ((-1 + 8) << 4)]
    np.testing.assert_array_equal(quant.unpack(rows, q), ints)
    with pytest.raises(quant.QuantError, match="must divide half the row width"):
        quant.Quant(bits=4, group=4, width=4)
    gated = ModelConfig.from_hf_config(tiny_llama_config(hidden_size=64))  # half row: 96
    assert quant.Quant.for_model("int4", gated).group == 32


@pytest.mark.parametrize("bits", [8, 4])
def test_mse_scales_never_err_more_than_round_to_nearest(bits):
    """The clip search includes ratio 1 (round to nearest): its weighted error per group is
    never larger, and smaller somewhere for int4 (where clipping pays)."""
    v = _rows(200, seed=1)
    weights = np.random.default_rng(2).uniform(0.1, 3, 256).astype(np.float32)
    errs = {}
    for method in quant.METHODS:
        q = quant.Quant(bits=bits, group=64, width=256, method=method)
        rows, s = quant.encode(v, q, weights if method == "mse" else None)
        errs[method] = (weights * (quant.decode(rows, q) - v) ** 2).reshape(200, 4, 64).sum(-1)
    assert np.all(errs["mse"] <= errs["rtn"] * (1 + 1e-5) + 1e-12)
    if bits == 4:
        assert errs["mse"].sum() < 0.95 * errs["rtn"].sum()


def test_layouts_for_model_shapes():
    """Scales go resident where the values alone fill whole blocks (OPT-6.7B's rows), else
    in the row; a group must divide the model width."""
    opt67 = ModelConfig.from_hf_config(tiny_opt_config(hidden_size=4096, ffn_dim=16384,
                                                       num_attention_heads=32))
    q8, q4 = (quant.Quant.for_model(d, opt67) for d in ("int8", "int4"))
    assert (q8.scales, q8.row_bytes, q8.group) == ("dram", 8192, 128)
    assert (q4.scales, q4.row_bytes, q4.group) == ("dram", 4096, 64)
    small = ModelConfig.from_hf_config(tiny_opt_config(hidden_size=256))
    q = quant.Quant.for_model("int8", small)
    assert (q.scales, q.row_bytes) == ("row", 512 + 8 + 8)  # 4 scales of 2 B, padded to 16
    with pytest.raises(quant.QuantError, match="does not divide the model width 256"):
        quant.Quant.for_model("int4", small, group=96)
    with pytest.raises(quant.QuantError, match="not one of"):
        quant.Quant.for_model("int2", small)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """One sparse random OPT model: its float16 store and one per quantized layout."""
    root = tmp_path_factory.mktemp("quant")
    fp = synthetic_store(root, SPARSE, seed=3, ffn_active=0.05)
    made = {"float16": fp}
    for ffn_dtype, scales in LAYOUTS:
        out = root / f"{ffn_dtype}-{scales}"
        flashjax.convert(root / "hf", out, ffn_dtype=ffn_dtype, scales=scales, progress=False)
        made[ffn_dtype, scales] = out
    return made


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("overlap", [True, False])
def test_oracle_flash_equals_dense_of_the_dequantized_weights(stores, layout, overlap):
    """The flash engine over quantized rows (decoded as they enter the buffers and as they
    stream) computes what the dense model of the same dequantized weights computes: same
    greedy tokens, logits within float32 rounding; bytes read are quantized rows."""
    path = stores[layout]
    dense = flashjax.load(path, progress=False)
    flash = flashjax.load(path, dram_budget=0.4, predictor="oracle", window=3, overlap=overlap)
    ids, stats = flash.generate(PROMPT, 12, stop_at_eos=False, return_stats=True)
    assert ids == dense.generate(PROMPT, 12, stop_at_eos=False)
    assert stats["rows_loaded"] > 0 and stats["rows_dropped"] == 0
    manifest = Manifest.read(path)
    assert flash.reader.row_bytes == manifest.row_bytes == manifest.quant.row_bytes
    assert stats["flash_bytes_read"] == (stats["rows_loaded"] + stats["rows_streamed"]) * \
        manifest.row_bytes
    seq = PROMPT + ids
    a, b = flash.logits(seq), dense.logits(seq)
    assert np.linalg.norm(a - b) / np.linalg.norm(b) <= 1e-5  # float32 rounding
    # the resident rows are the decoded bundles of their neurons, bit for bit
    _, state = flash.generate(PROMPT, 4, stop_at_eos=False, return_state=True)
    scales = bundles.load_scales(path, manifest)
    for layer, (cache, buf) in enumerate(zip(state.index, state.buffers)):
        cache.check()
        values = bundles.read_layer_values(path, layer, manifest, None, scales)[cache.resident]
        held = np.concatenate([np.asarray(p)[:cache.n] for p in buf.parts], axis=1)
        np.testing.assert_array_equal(held, values)


def test_streamed_quantized_rows_equal_dense(stores):
    """Naive streaming (every row through the staged kernel, none kept)."""
    path = stores["int4", "row"]
    dense = flashjax.load(path, progress=False)
    flash = flashjax.load(path, dram_budget=0.4, predictor="naive")
    assert flash.generate(PROMPT, 6, stop_at_eos=False) == \
        dense.generate(PROMPT, 6, stop_at_eos=False)


def test_quantized_stores_read_fewer_bytes_and_stay_close(stores):
    """Same rows, fewer bytes; the dequantized model stays close to the float16 one."""
    fp = flashjax.load(stores["float16"], progress=False).logits(PROMPT)
    row = {}
    for layout in LAYOUTS:
        m = Manifest.read(stores[layout])
        row[layout] = m.row_bytes
        logits = flashjax.load(stores[layout], progress=False).logits(PROMPT)
        err = np.linalg.norm(logits - fp) / np.linalg.norm(fp)
        assert err < (0.01 if layout[0] == "int8" else 0.1), (layout, err)
    fp_row = Manifest.read(stores["float16"]).row_bytes  # 128 values x 2 B
    assert fp_row == 256
    assert row == {("int8", "row"): 144, ("int8", "dram"): 128, ("int4", "row"): 80,
                   ("int4", "dram"): 64}


def test_budget_counts_quantized_staging_and_resident_scales(stores):
    """Budget fractions refer to the same bytes for every store of a model; staging rows are
    quantized rows; resident scales are part of what is resident."""
    fp = Manifest.read(stores["float16"])
    f32 = np.dtype(np.float32)
    for layout in LAYOUTS:
        m = Manifest.read(stores[layout])
        assert dense_bytes(m, f32) == dense_bytes(fp, f32)
        flash = flashjax.load(stores[layout], dram_budget=0.5, predictor="oracle")
        plan = flash.memory
        assert plan.staging == plan.staging_slots * plan.update_rows * m.row_bytes
        assert flash.reader.staging.dtype == np.uint8
        assert flash.reader.staging.shape[1] == m.row_bytes
        scales = m.scale_bytes
        assert (scales > 0) == (layout[1] == "dram")
        plain = flashjax.load(stores["float16"], dram_budget=0.5, predictor="oracle").memory
        assert plan.resident == plain.resident + scales


def _flip_row_byte(path, layer=1, neuron=5, byte=3):
    manifest = Manifest.read(path)
    array = path / "ffn" / bundles.layer_key(layer)
    offsets = shard_row_offsets(array, manifest.config.ffn_dim, manifest.row_bytes)
    shard = array / "c" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[int(offsets[neuron]) + byte] ^= 0x10
    shard.write_bytes(bytes(raw))


@pytest.mark.parametrize("layout", [("int4", "row"), ("int8", "dram")])
def test_crc_catches_a_flipped_bit_in_a_quantized_row(stores, tmp_path, layout):
    """A flipped bit in a stored row is a crc32c mismatch naming the neuron, on a flash read
    and in `verify`; in a scale of the row or of scales.npy too."""
    path = shutil.copytree(stores[layout], tmp_path / "m")
    q = Manifest.read(path).quant
    at = q.value_bytes + 1 if q.scales == "row" else 3  # a scale byte, else a value byte
    _flip_row_byte(path, neuron=5, byte=at)
    with pytest.raises(StoreError, match=r"crc32c mismatch in 1 row\(s\) \(neurons 5\)"):
        flashjax.load(path, dram_budget=1.0, predictor="naive").generate(PROMPT, 1)
    with pytest.raises(StoreError, match="neurons 5"):
        verify(path, progress=False)
    if q.scales == "dram":
        scales = np.load(path / "ffn" / quant.SCALES_FILE)
        scales[0, 0, 0] = -scales[0, 0, 0]
        np.save(path / "ffn" / quant.SCALES_FILE, scales)
        with pytest.raises(StoreError, match="scales.npy: crc32 .* differs"):
            flashjax.load(path, dram_budget=1.0, predictor="naive")


def test_manifest_records_the_layout_and_refuses_a_wrong_one(stores, tmp_path):
    path = shutil.copytree(stores["int4", "row"], tmp_path / "m")
    doc = json.loads((path / "manifest.json").read_text())
    assert doc["format_version"] == 3
    assert doc["layout"]["ffn"]["dtype"] == "int4"
    assert doc["layout"]["ffn"]["quant"] == {"bits": 4, "group": 64, "scales": "row",
                                             "scale_dtype": "float16", "method": "rtn",
                                             "value_bytes": 64, "row_bytes": 80}
    assert json.loads((stores["float16"] / "manifest.json").read_text())["format_version"] == 2
    doc["layout"]["ffn"]["quant"]["group"] = 48
    (path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(StoreError, match=r"field 'layout.ffn.quant': group size 48 must be even "
                                         r"and divide the row width 128"):
        Manifest.read(path)
    del doc["layout"]["ffn"]["quant"]
    (path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="'layout.ffn.quant' is missing"):
        Manifest.read(path)


def test_export_dequantizes_with_a_warning(stores, tmp_path, caplog):
    """export writes the dequantized weights: the exported model, converted back as float32,
    computes what the quantized store's dense model does."""
    path = stores["int8", "row"]
    with caplog.at_level("WARNING"):
        export_model_dir(path, tmp_path / "hf", dtype="float32", progress=False)
    assert "exporting them dequantized" in caplog.text
    flashjax.convert(tmp_path / "hf", tmp_path / "back", progress=False)
    a = flashjax.load(tmp_path / "back", progress=False).logits(PROMPT)
    b = flashjax.load(path, progress=False).logits(PROMPT)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_quantize_a_store_with_calibrated_scales(tmp_path):
    """`flashjax quantize --method mse` fits the scales to collected activations, keeps the
    predictors and DRAM part, and is closer to float16 than round to nearest (int4, Llama)."""
    fp, model, _ = llama_with_activations(tmp_path)
    (fp / "predictors").mkdir()  # carried over as it is
    (fp / "predictors" / "marker").write_text("x")
    assert main(["quantize", str(fp), str(tmp_path / "rtn"), "--ffn-dtype", "int4"]) == 0
    assert main(["quantize", str(fp), str(tmp_path / "mse"), "--ffn-dtype", "int4",
                 "--method", "mse", "--data", str(tmp_path / "acts")]) == 0
    assert (tmp_path / "mse" / "predictors" / "marker").read_text() == "x"
    assert Manifest.read(tmp_path / "mse").quant.method == "mse"
    held = np.random.default_rng(1).integers(3, model.cfg.vocab_size, (4, 48))
    ref = model.logits(held)
    err = {m: float(np.square(flashjax.load(tmp_path / m, progress=False).logits(held) - ref)
                    .mean()) for m in ("rtn", "mse")}
    assert err["mse"] < err["rtn"], err
    other = tiny_llama_config(vocab_size=300, hidden_size=32, intermediate_size=512)
    random_hf_checkpoint(tmp_path / "hf-other", other, seed=2)
    flashjax.convert(tmp_path / "hf-other", tmp_path / "fj-other", progress=False)
    with pytest.raises(ValueError, match=r"activations of width 64 and 2 layers; the model has "
                                         r"32 and 2"):
        flashjax.quantize(tmp_path / "fj-other", tmp_path / "wrong", "int4", method="mse",
                          data=tmp_path / "acts")
    with pytest.raises(ValueError, match="already int4"):
        flashjax.quantize(tmp_path / "rtn", tmp_path / "again", "int8")
    with pytest.raises(ValueError, match="method 'mse' .* give calibration data"):
        flashjax.quantize(fp, tmp_path / "no-data", "int4", method="mse")
    assert not (tmp_path / "again").exists() and not (tmp_path / "no-data").exists()


def test_cli_convert_and_info(stores, tmp_path, capsys):
    hf = stores["float16"].parent / "hf"
    assert main(["convert", str(hf), str(tmp_path / "q"), "--ffn-dtype", "int8",
                 "--group", "32"]) == 0
    # 128 values + 4 scales of 2 B, padded to 16 B
    assert "int8 rows of 144 B (groups of 32, scales in the rows, rtn)" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "q")]) == 0
    assert "int8 (rtn, groups of 32, scales in the rows) rows of 144 B" in capsys.readouterr().out


@pytest.mark.parametrize("reads", [{"io_uring": False}, {"direct_io": False}])
def test_quantized_rows_through_every_read_path(stores, reads):
    """TensorStore's reads (no io_uring) and page-cache reads bring the same quantized rows."""
    path = stores["int8", "dram"]
    dense = flashjax.load(path, progress=False)
    flash = flashjax.load(path, dram_budget=0.4, predictor="oracle", window=2, **reads)
    assert not flash.reader.uses_io_uring
    assert flash.generate(PROMPT, 6, stop_at_eos=False) == \
        dense.generate(PROMPT, 6, stop_at_eos=False)


def test_missing_or_wrong_scales_file_is_named(stores, tmp_path):
    """scales.npy is checked like the checksum file: missing, or of another shape."""
    path = shutil.copytree(stores["int8", "dram"], tmp_path / "m")
    scales = path / "ffn" / quant.SCALES_FILE
    np.save(scales, np.zeros((1, 2), np.float16))
    with pytest.raises(StoreError, match=r"scales.npy: float16 array of shape \(1, 2\); "
                                         r"expected the rows' float16 scales of shape"):
        flashjax.load(path, dram_budget=1.0, predictor="naive")
    scales.unlink()
    with pytest.raises(StoreError, match="scales.npy: missing scales file"):
        flashjax.load(path, dram_budget=1.0, predictor="naive")
