"""A damaged model directory is refused with an error naming the file, the field or tensor,
expected vs found; conversions interrupted or racing leave nothing behind."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import flashjax
from flashjax import ConfigError, StoreError
from flashjax.store import bundles
from flashjax.store import convert as convert_mod
from flashjax.store.load import read_dram
from flashjax.store.manifest import FORMAT_VERSION, Manifest
from flashjax.store.verify import verify
from flashjax.testing import synthetic_hf_checkpoint, synthetic_store, tiny_llama_config, \
    tiny_opt_config


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    made = {"opt": synthetic_store(root / "opt", tiny_opt_config()),
            "llama": synthetic_store(root / "llama", tiny_llama_config())}
    # quantized stores (format version 3): rows with their scales, and resident scales
    for name, base, ffn_dtype, scales in (("opt-int4", "opt", "int4", None),
                                          ("llama-int8", "llama", "int8", "dram")):
        flashjax.quantize(made[base], root / name, ffn_dtype, scales=scales, progress=False)
        made[name] = root / name
    return made


@pytest.fixture
def model(stores, tmp_path):
    """A fresh copy of the converted tiny OPT model, to damage."""
    return Path(shutil.copytree(stores["opt"], tmp_path / "model"))


def _manifest(model_dir) -> dict:
    return json.loads((model_dir / "manifest.json").read_text())


def _write_manifest(model_dir, d) -> None:
    (model_dir / "manifest.json").write_text(json.dumps(d))


def _flip_largest(model_dir, group="layer_001") -> Path:
    """Flip a byte of tensor data in the group's largest file. Orbax writes its arrays
    concurrently, so where a tensor's bytes lie in the file varies from one conversion to the
    next, and some bytes (padding, unread metadata) change nothing: try positions from the
    middle to the end, then from the start (and the next largest files), until restoring the
    group, unchecked, gives other values."""
    import orbax.checkpoint as ocp

    path = (model_dir / "dram" / group).absolute()
    clean = ocp.StandardCheckpointer().restore(path)
    files = sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: -p.stat().st_size)
    for big in files[:3]:
        original = big.read_bytes()
        half = len(original) // 2
        for offset in [*range(half, len(original), 97), *range(0, half, 97)]:
            raw = bytearray(original)
            raw[offset] ^= 0xFF
            big.write_bytes(bytes(raw))
            try:
                damaged = ocp.StandardCheckpointer().restore(path)
            except Exception:  # a byte orbax itself checks: not the data
                continue
            if any(not np.array_equal(a, b, equal_nan=True) for a, b in
                   zip(jax.tree.leaves(clean), jax.tree.leaves(damaged))):
                return big
        big.write_bytes(original)
    raise AssertionError(f"no byte of the largest files of {path} changes a tensor of {group}")


# --- DRAM checksums ------------------------------------------------------------------------


def test_manifest_records_a_crc32_per_dram_tensor(stores):
    d = _manifest(stores["opt"])
    assert d["format_version"] == 2 and FORMAT_VERSION == 3  # 3: quantized rows
    assert set(d["dram_checksums"]) == {"top", "layer_000", "layer_001"}
    tree = read_dram(stores["opt"], Manifest.read(stores["opt"]))
    q = tree["layers_1"]["self_attn"]["q_proj"]["kernel"]
    import zlib
    assert d["dram_checksums"]["layer_001"]["layers_1/self_attn/q_proj/kernel"] == \
        zlib.crc32(np.ascontiguousarray(q).tobytes())
    assert "embed_tokens/embedding" in d["dram_checksums"]["top"]


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_flipped_dram_bytes_are_caught_on_load_and_by_verify(stores, tmp_path, family):
    model_dir = Path(shutil.copytree(stores[family], tmp_path / "m"))
    _flip_largest(model_dir)
    group = model_dir / "dram" / "layer_001"
    # orbax itself restores the flipped data without complaint: only the crc32 sees it
    pattern = (rf"{re.escape(str(group.absolute()))}: tensor 'layers_1/self_attn/\w+/kernel' "
               rf"has crc32 \d+, expected \d+ \(recorded in .*manifest.json\)")
    with pytest.raises(StoreError, match=pattern + ".*reconvert the model"):
        flashjax.load(model_dir, progress=False)
    with pytest.raises(StoreError, match=pattern):
        flashjax.load(model_dir, dram_budget=10_000_000, predictor="naive", max_context=16,
                      progress=False)
    with pytest.raises(StoreError, match=r"1 problem\(s\) found:\n  - " + pattern):
        verify(model_dir, progress=False)


def test_flipped_dram_bytes_stop_an_export(model, tmp_path):
    from flashjax.store.export import export_model_dir

    _flip_largest(model)
    with pytest.raises(StoreError, match=r"dram/layer_001: tensor 'layers_1/self_attn/"):
        export_model_dir(model, tmp_path / "hf_out", progress=False)
    assert not (tmp_path / "hf_out").exists() and not list(tmp_path.glob(".hf_out.partial-*"))


def test_damaged_dram_metadata_is_a_store_error_naming_the_group(model):
    """Where orbax does notice (its own metadata damaged), the error still names the group."""
    group = model / "dram" / "layer_000"
    meta = group / "_METADATA"
    meta.write_text(meta.read_text()[:-20])
    with pytest.raises(StoreError, match=rf"{re.escape(str(group.absolute()))}: cannot restore "
                                         r"the DRAM checkpoint"):
        flashjax.load(model, progress=False)


def test_a_version_1_manifest_loads_with_one_warning(model, caplog):
    d = _manifest(model)
    del d["dram_checksums"]
    d["format_version"] = 1
    _write_manifest(model, d)
    _flip_largest(model)  # cannot be seen without the checksums
    with caplog.at_level(logging.WARNING):
        flashjax.load(model, progress=False)
        flashjax.load(model, progress=False)
        report = verify(model, progress=False)
    warnings = [r.getMessage() for r in caplog.records if "cannot be checked" in r.getMessage()]
    assert len(warnings) == 1
    assert "format version 1" in warnings[0] and "reconvert" in warnings[0]
    assert str(model / "manifest.json") in warnings[0]
    assert "DRAM part not checked (format version 1" in report


def test_a_crc_that_differs_from_the_manifests(model):
    d = _manifest(model)
    d["dram_checksums"]["layer_000"]["layers_0/self_attn/q_proj/kernel"] ^= 1
    _write_manifest(model, d)
    with pytest.raises(StoreError, match=r"layer_000: tensor 'layers_0/self_attn/q_proj/kernel'"
                                         r" has crc32 \d+, expected \d+"):
        flashjax.load(model, progress=False)


def test_dram_tensors_missing_from_the_checkpoint_or_of_another_dtype(model):
    import orbax.checkpoint as ocp

    group = (model / "dram" / "layer_000").absolute()
    tree = ocp.StandardCheckpointer().restore(group)
    del tree["layers_0"]["ffn"]["fc2"]["bias"]
    tree["layers_0"]["final_layer_norm"]["scale"] = \
        tree["layers_0"]["final_layer_norm"]["scale"].astype(np.float32)
    shutil.rmtree(group)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(group, tree)
    checkpointer.close()
    with pytest.raises(StoreError) as e:
        flashjax.load(model, progress=False)
    assert str(e.value) == (
        f"{group}: tensor(s) ['layers_0/ffn/fc2/bias'] missing; {model}/manifest.json lists them; "
        f"{group}: tensor 'layers_0/final_layer_norm/scale' is stored as float32, expected "
        f"float16 (the manifest's 'dtype'); the DRAM checkpoint is corrupt, reconvert the model")


def test_a_missing_dram_group(model):
    shutil.rmtree(model / "dram" / "layer_001")
    with pytest.raises(StoreError, match=r"dram/layer_001: cannot restore the DRAM checkpoint"):
        flashjax.load(model, progress=False)
    with pytest.raises(StoreError, match=r"dram/layer_001: missing DRAM group"):
        verify(model, progress=False)


# --- manifest validation -------------------------------------------------------------------


def _set(path, value):
    def edit(d):
        *parents, last = path
        for key in parents:
            d = d[key]
        d[last] = value
    return edit


def _delete(*path):
    def edit(d):
        *parents, last = path
        for key in parents:
            d = d[key]
        del d[last]
    return edit


MANIFEST_DEFECTS = {
    "a list": (lambda d: [d], StoreError,
               r"expected a JSON object at the top level, found a list"),
    "no config": (_delete("config"), StoreError,
                  r"field 'config' is missing; expected an object"),
    "no sizes": (_delete("sizes"), StoreError, r"field 'sizes' is missing; expected an object"),
    "no dtype": (_delete("dtype"), StoreError,
                 r"field 'dtype' is missing; expected one of \('float16'"),
    "no format": (_delete("format"), StoreError, r"field 'format' is missing; expected 'flashjax'"),
    "other format": (_set(["format"], "gguf"), StoreError,
                     r"field 'format' is 'gguf' \(a string\); expected 'flashjax'"),
    "newer version": (_set(["format_version"], 4), StoreError,
                      r"field 'format_version' is 4 \(an integer\); expected one of \(1, 2, 3\) "
                      r"\(written by a newer flashjax"),
    "version 3 without quant": (_set(["format_version"], 3), StoreError,
                                r"field 'layout.ffn.quant' is missing; format_version 3 is a "
                                r"store of quantized rows"),
    "dtype int8": (_set(["dtype"], "int8"), StoreError,
                   r"field 'dtype' is 'int8' \(a string\); expected one of"),
    "dram_bytes lots": (_set(["sizes", "dram_bytes"], "lots"), StoreError,
                        r"field 'sizes.dram_bytes' is 'lots' \(a string\); expected a "
                        r"non-negative integer"),
    "dram_bytes negative": (_set(["sizes", "dram_bytes"], -5), StoreError,
                            r"field 'sizes.dram_bytes' is -5 \(an integer\); expected a "
                            r"non-negative integer"),
    "dram_bytes bool": (_set(["sizes", "dram_bytes"], True), StoreError,
                        r"field 'sizes.dram_bytes' is True \(a boolean\)"),
    "dram_bytes wrong": (_set(["sizes", "dram_bytes"], 12345), StoreError,
                         r"field 'sizes.dram_bytes' is 12345; expected \d+ from the config and "
                         r"dtype \(the DRAM tensors of the config in float16\)"),
    "ffn_bytes wrong": (_set(["sizes", "ffn_bytes"], 100), StoreError,
                        r"field 'sizes.ffn_bytes' is 100; expected 32768 from the config and dtype"),
    "ffn_bytes missing": (_delete("sizes", "ffn_bytes"), StoreError,
                          r"field 'sizes.ffn_bytes' is missing; expected a non-negative integer"),
    "row_bytes wrong": (_set(["layout", "ffn", "row_bytes"], 256), StoreError,
                        r"field 'layout.ffn.row_bytes' is 256; expected 128 from the config and "
                        r"dtype \(bundle width 64 x 2 bytes \(float16\)\)"),
    "shape wrong": (_set(["layout", "ffn", "shape"], [128, 96]), StoreError,
                    r"field 'layout.ffn.shape' is \[128, 96\] \(a list\); expected \[128, 64\]"),
    "sizes a list": (_set(["sizes"], [1, 2]), StoreError,
                     r"field 'sizes' is \[1, 2\] \(a list\); expected an object"),
    "tokenizer absent": (_set(["tokenizer"], "tokenizer.json"), StoreError,
                         r"field 'tokenizer' is 'tokenizer.json', but .*tokenizer.json is missing"),
    "tokenizer unknown": (_set(["tokenizer"], "spm.model"), StoreError,
                          r"field 'tokenizer' is 'spm.model' \(a string\); expected null or one of"),
    "source a string": (_set(["source"], "hf"), StoreError,
                        r"field 'source' is 'hf' \(a string\); expected an object"),
    "checksums missing": (_delete("dram_checksums"), StoreError,
                          r"field 'dram_checksums' is missing; expected an object"),
    "checksum group missing": (_delete("dram_checksums", "layer_001"), StoreError,
                               r"field 'dram_checksums' has 2 group\(s\); expected 3 \('top' and "
                               r"one per layer of config.num_hidden_layers 2\); missing "
                               r"\['layer_001'\]"),
    "checksum tensor missing": (_delete("dram_checksums", "top", "embed_tokens/embedding"),
                                StoreError, r"field 'dram_checksums.top' does not list the tensors "
                                            r"the config implies; missing "
                                            r"\['embed_tokens/embedding'\]"),
    "checksum negative": (_set(["dram_checksums", "top", "embed_tokens/embedding"], -1),
                          StoreError, r"field 'dram_checksums.top.embed_tokens/embedding' is -1 "
                                      r"\(an integer\); expected a crc32"),
    "config unknown family": (_set(["config", "model_type"], "gpt2"), ConfigError,
                              r"field 'config': field 'model_type' is 'gpt2'; flashjax supports"),
    "config missing field": (_delete("config", "ffn_dim"), ConfigError,
                             r"field 'config': missing required field\(s\) \['ffn_dim'\]"),
    "config heads a string": (_set(["config", "num_attention_heads"], "4"), ConfigError,
                              r"field 'config'.*'num_attention_heads' must be a positive integer, "
                              r"found '4'"),
    "config a list": (_set(["config"], []), StoreError,
                      r"field 'config' is \[\] \(a list\); expected an object"),
}


@pytest.mark.parametrize("defect", sorted(MANIFEST_DEFECTS))
def test_manifest_defect(model, defect):
    edit, error, message = MANIFEST_DEFECTS[defect]
    d = _manifest(model)
    d = edit(d) or d
    _write_manifest(model, d)
    path = re.escape(str(model / "manifest.json"))
    with pytest.raises(error, match=rf"^{path}[: ].*{message}") as e:
        flashjax.load(model, progress=False)
    assert type(e.value) is error
    with pytest.raises(error, match=message):
        verify(model, progress=False)


def test_manifest_not_json(model):
    (model / "manifest.json").write_bytes(b"\x80\x81{not json")
    with pytest.raises(StoreError, match=rf"{re.escape(str(model))}/manifest.json: not valid JSON"):
        flashjax.load(model, progress=False)


def test_directories_where_files_belong(model):
    (model / "manifest.json").unlink()
    (model / "manifest.json").mkdir()
    with pytest.raises(StoreError, match=r"manifest.json: is a directory; expected the manifest "
                                         r"file \(JSON\)"):
        flashjax.load(model, progress=False)


def test_tokenizer_directory(model):
    d = _manifest(model)
    d["tokenizer"] = "tokenizer.json"
    _write_manifest(model, d)
    (model / "tokenizer.json").mkdir()
    message = (rf"{re.escape(str(model))}/tokenizer.json: is a directory; expected the tokenizer "
               rf"file that .*manifest.json field 'tokenizer' names")
    with pytest.raises(StoreError, match=message):
        flashjax.load(model, progress=False)
    with pytest.raises(StoreError, match=r"1 problem\(s\) found:\n  - " + message):
        verify(model, progress=False)


# --- crc32.npy -----------------------------------------------------------------------------

CRC_WANTED = r"expected the rows' crc32s, a uint32 array of shape \(2, 128\) \(\[layers, neurons\] of the manifest\)"


def _random_bytes(path):
    path.write_bytes(np.random.default_rng(0).bytes(1000))


CRC_DEFECTS = {
    "random bytes": (_random_bytes, rf"crc32.npy: not a valid .npy file \(.*\); {CRC_WANTED}"),
    "wrong dtype": (lambda p: np.save(p, np.zeros((2, 128), np.int64)),
                    rf"crc32.npy: int64 array of shape \(2, 128\); {CRC_WANTED}"),
    "too few layers": (lambda p: np.save(p, np.zeros((1, 128), np.uint32)),
                       rf"crc32.npy: uint32 array of shape \(1, 128\); {CRC_WANTED}"),
    "pickled objects": (lambda p: np.save(p, np.array([{"a": 1}], object), allow_pickle=True),
                        rf"crc32.npy: not a valid .npy file \(.*allow_pickle.*\); {CRC_WANTED}"),
    "a directory": (lambda p: (p.unlink(), p.mkdir()),
                    rf"crc32.npy: is a directory; {CRC_WANTED}"),
    "missing": (lambda p: p.unlink(), rf"crc32.npy: missing checksum file; {CRC_WANTED}"),
}


@pytest.mark.parametrize("defect", sorted(CRC_DEFECTS))
def test_checksum_file_defect(model, defect):
    damage, message = CRC_DEFECTS[defect]
    damage(model / "ffn" / "crc32.npy")
    message = rf"{re.escape(str(model))}/ffn/{message}"
    with pytest.raises(StoreError, match=message):
        bundles.load_checksums(model)
    with pytest.raises(StoreError, match=message):
        flashjax.load(model, progress=False)
    with pytest.raises(StoreError, match=message):
        flashjax.load(model, dram_budget=10_000_000, predictor="naive", max_context=16,
                      progress=False)
    with pytest.raises(StoreError, match=r"1 problem\(s\) found:\n  - " + message):
        verify(model, progress=False)


# --- verify --------------------------------------------------------------------------------


def test_verify_lists_every_problem(model, capsys):
    d = _manifest(model)
    d["tokenizer"] = "vocab.json"
    _write_manifest(model, d)
    shutil.rmtree(model / "dram" / "top")
    _flip_largest(model, "layer_001")
    shutil.rmtree(model / "ffn" / "layer_000")
    (shard,) = (model / "ffn" / "layer_001").rglob("c/*/*")
    raw = bytearray(shard.read_bytes())
    raw[5 * 128 + 3] ^= 0x10  # a bit of neuron 5
    shard.write_bytes(bytes(raw))
    (model / "ffn" / "layer_007").mkdir()
    with pytest.raises(StoreError) as e:
        verify(model)
    message = str(e.value)
    assert message.startswith(f"{model}: 6 problem(s) found:\n  - ")
    for part in (f"field 'tokenizer' is 'vocab.json', but {model}/vocab.json is missing",
                 f"field 'tokenizer' is 'vocab.json', but {model}/merges.txt is missing",
                 f"{model}/dram/top: missing DRAM group",
                 f"{(model / 'dram' / 'layer_001').absolute()}: tensor 'layers_1/self_attn/",
                 f"{model}/ffn: 2 bundle array(s), expected 2 (num_hidden_layers in "
                 f"{model}/manifest.json); missing ['layer_000']; unexpected ['layer_007']",
                 f"{model}/ffn/layer_001: crc32c mismatch in 1 row(s) (neurons 5)"):
        assert part in message
    err = capsys.readouterr().err
    assert "verify DRAM" in err and "verify FFN" in err  # progress bars for both parts


def test_verify_checks_each_arrays_shape_and_dtype(model, stores):
    other = synthetic_store(model.parent / "other", tiny_opt_config(ffn_dim=64))
    shutil.rmtree(model / "ffn" / "layer_001")
    shutil.copytree(other / "ffn" / "layer_001", model / "ffn" / "layer_001")
    with pytest.raises(StoreError, match=r"ffn/layer_001: shape \(64, 64\), expected \(128, 64\)"):
        verify(model, progress=False)


def test_verify_ok_report(stores):
    assert verify(stores["llama"], progress=False).endswith("float16; DRAM crc32-checked)")


# --- hypothesis: Manifest.read never fails any other way -----------------------------------

JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats()
    | st.text(max_size=6) | st.sampled_from(["opt", "llama", "float16", "relu", "top"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                  max_size=3),
    max_leaves=8)


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


@st.composite
def mutated(draw, docs):
    doc = copy.deepcopy(draw(st.sampled_from(docs)))
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(list(_paths(doc))))
        action = draw(st.sampled_from(["delete", "replace", "nudge"]))
        if not path:
            doc = draw(JUNK)
            continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        old = parent[path[-1]]
        if action == "delete":
            del parent[path[-1]]
        elif action == "nudge" and isinstance(old, int) and not isinstance(old, bool):
            parent[path[-1]] = old + draw(st.sampled_from([-old - 1, -1, 1, old, 2 ** 40]))
        else:
            parent[path[-1]] = draw(JUNK)
    return doc


def test_manifest_read_fuzz(stores, tmp_path):
    """Mutated OPT and Llama manifests (keys deleted, values replaced by junk of any type or
    nudged): each loads, or raises StoreError/ConfigError naming the manifest."""
    docs = [_manifest(stores[name]) for name in sorted(stores)]
    path = tmp_path / "manifest.json"

    @settings(max_examples=400, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(doc=mutated(docs))
    def check(doc):
        path.write_text(json.dumps(doc))
        try:
            Manifest.read(tmp_path)
        except (StoreError, ConfigError) as e:
            assert str(path) in str(e), str(e)

    check()
    for doc in docs:  # the unmutated manifests read back
        path.write_text(json.dumps(doc))
        Manifest.read(tmp_path)


# --- interrupted and concurrent conversions ------------------------------------------------


@pytest.fixture
def hf(tmp_path):
    return synthetic_hf_checkpoint(tmp_path / "hf", tiny_opt_config(), dtype="float32")


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()  # reaped: the pid names no process now
    return p.pid


def test_stale_partial_dirs_of_dead_processes_are_removed(hf, tmp_path, caplog):
    dead = tmp_path / f".old.partial-{_dead_pid()}"
    (dead / "dram").mkdir(parents=True)
    (dead / "dram" / "junk").write_bytes(b"x" * 100)
    live = subprocess.Popen(["sleep", "60"])
    try:
        busy = tmp_path / f".busy.partial-{live.pid}"
        busy.mkdir()
        unrelated = tmp_path / ".notes.partial-abc"
        unrelated.mkdir()
        with caplog.at_level(logging.WARNING, logger="flashjax.store.convert"):
            flashjax.convert(hf, tmp_path / "out", progress=False)
        assert not dead.exists()
        assert busy.is_dir() and unrelated.is_dir()  # a live process's, and not ours
        (line,) = [r.getMessage() for r in caplog.records if "partial" in r.getMessage()]
        assert line == (f"removed 1 partial output(s) of interrupted conversions whose process "
                        f"is gone: {dead}")
    finally:
        live.kill()
        live.wait()
    assert Manifest.read(tmp_path / "out").config.num_hidden_layers == 2


def test_the_loser_of_a_rename_race_gets_file_exists(hf, tmp_path, stores, monkeypatch):
    out = tmp_path / "out"
    real = os.rename

    def racing(src, dst):
        if Path(dst) == out:  # the other conversion renames its output into place just now
            shutil.copytree(stores["opt"], out)
        return real(src, dst)

    monkeypatch.setattr(os, "rename", racing)
    with pytest.raises(FileExistsError, match=rf"^another conversion finished "
                                              rf"{re.escape(str(out))} first"):
        flashjax.convert(hf, out, progress=False)
    assert not list(tmp_path.glob(".out.partial-*"))
    assert (out / "manifest.json").read_text() == (stores["opt"] / "manifest.json").read_text()


def test_the_loser_that_sees_the_winner_before_renaming(hf, tmp_path, stores, monkeypatch):
    out = tmp_path / "out"
    real = bundles.create_layer

    def winner_appears(model_dir, layer, rows, context):
        real(model_dir, layer, rows, context)
        if layer == 1:
            shutil.copytree(stores["opt"], out)

    monkeypatch.setattr(bundles, "create_layer", winner_appears)
    with pytest.raises(FileExistsError, match="another conversion finished .*out first"):
        flashjax.convert(hf, out, progress=False)
    assert not list(tmp_path.glob(".out.partial-*"))
    assert Manifest.read(out).dram_checksums == Manifest.read(stores["opt"]).dram_checksums


def test_two_concurrent_conversions(hf, tmp_path):
    """Real processes: one wins, the other fails cleanly with FileExistsError."""
    code = ("import sys, flashjax\n"
            "try:\n"
            f"    flashjax.convert({str(hf)!r}, {str(tmp_path / 'out')!r}, progress=False)\n"
            "except FileExistsError as e:\n"
            "    print('LOST', e); sys.exit(3)\n")
    procs = [subprocess.Popen([os.sys.executable, "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(), p.stdout.read(), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert sorted(rc for rc, _, _ in results) == [0, 3], results
    (lost,) = [out for rc, out, _ in results if rc == 3]
    assert re.search(r"LOST (another conversion finished|output directory) .*out", lost)
    assert "Directory not empty" not in lost
    assert not list(tmp_path.glob(".out.partial-*"))
    verify(tmp_path / "out", progress=False)


def test_interrupt_while_orbax_saves_waits_for_its_threads(hf, tmp_path, monkeypatch, capfd):
    """Ctrl-C with a DRAM save still committing in orbax's background thread: the thread is
    waited for, then the partial directory removed, and nothing prints a traceback."""
    import orbax.checkpoint as ocp

    events = []
    real_wait = ocp.StandardCheckpointer.wait_until_finished
    real_rmtree = shutil.rmtree

    def wait(self):
        events.append("wait")
        return real_wait(self)

    def rmtree(path, *a, **k):
        if ".partial-" in str(path):
            events.append("rmtree")
        return real_rmtree(path, *a, **k)

    def interrupted_save(model_dir, group, tree, checkpointer):
        if group == "layer_000":
            checkpointer.save((model_dir / "dram" / group).absolute(), tree)
            events.append("interrupt")  # with the commit still in flight
            raise KeyboardInterrupt
        real_save(model_dir, group, tree, checkpointer)

    real_save = convert_mod.save_dram_group
    monkeypatch.setattr(ocp.StandardCheckpointer, "wait_until_finished", wait)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    monkeypatch.setattr(convert_mod, "save_dram_group", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        flashjax.convert(hf, tmp_path / "out", progress=False)
    after = events[events.index("interrupt"):]
    assert "wait" in after and after.index("wait") < after.index("rmtree"), events
    time.sleep(0.5)  # nothing writes into the removed directory later
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
    assert not [t for t in threading.enumerate() if t.name == "async_save" and t.is_alive()]
    assert "Traceback" not in capfd.readouterr().err


def test_sigint_during_a_save_is_held_until_the_save_is_done(hf, tmp_path, monkeypatch):
    """A real SIGINT arriving inside orbax's save is raised only once the group is written
    (orbax's threads could not be waited for otherwise)."""
    import signal

    import orbax.checkpoint as ocp

    real = ocp.StandardCheckpointer.save
    done = []

    def save(self, directory, *a, **k):
        if Path(directory).name == "layer_000":
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the save
        real(self, directory, *a, **k)
        done.append(Path(directory).name)

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", save)
    with pytest.raises(KeyboardInterrupt):
        flashjax.convert(hf, tmp_path / "out", progress=False)
    assert done == ["top", "layer_000"]  # the interrupted save was completed first
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_threaded_checksums_equal_serial(monkeypatch):
    from flashjax.store import load
    from flashjax.store.manifest import tensor_checksum

    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal(shape).astype(np.float16) for shape in [(64, 8), (3,), (5, 7, 2)]]
    arrays.append(arrays[0].T)  # not C-contiguous: checksummed in C order
    monkeypatch.setattr(load, "PARALLEL_CRC_BYTES", 0)
    assert load._checksums(arrays) == [tensor_checksum(x) for x in arrays]
    assert tensor_checksum(arrays[3]) == tensor_checksum(np.ascontiguousarray(arrays[3]))
