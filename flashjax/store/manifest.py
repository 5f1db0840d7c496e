"""``manifest.json``: what a converted model directory holds and how it is laid out.

Format version 2 adds ``dram_checksums``: the crc32 of every DRAM tensor's stored bytes (storage
dtype, C order), by DRAM group and "/"-joined parameter path. Version 1 manifests (without
them) are still read; their DRAM part cannot be checked. Version 3 is a store whose FFN rows
are quantized (``layout.ffn.quant``, see ``flashjax.store.quant``); float stores stay version 2.

``Manifest.read`` checks every field it uses, and that the sizes agree with the config and
dtype; each error names the manifest file, the field, what was expected and what was found.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from flashjax.config import ConfigError, ModelConfig
from flashjax.store.bundles import CHECKSUM_FILE, FFN_DIR, ROW_CHECKSUMS, StoreError
from flashjax.store.quant import FFN_DTYPES, METHODS, SCALE_PLACES, Quant, QuantError

FORMAT = "flashjax"
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # version 1: no dram_checksums; 3: quantized FFN rows
MANIFEST = "manifest.json"
DRAM_DIR = "dram"
DTYPES = ("float16", "bfloat16", "float32")
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
# The tokenizer files a manifest may name, and the files each needs beside it.
TOKENIZERS = {"tokenizer.json": ("tokenizer.json",), "vocab.json": ("vocab.json", "merges.txt")}


def dram_groups(cfg: ModelConfig) -> list[str]:
    """The DRAM checkpoint groups of a model: "top", then one per layer."""
    return ["top"] + [f"layer_{i:03d}" for i in range(cfg.num_hidden_layers)]


def tensor_checksum(x: np.ndarray) -> int:
    """crc32 of a tensor's bytes in its own dtype, C order: what ``dram_checksums`` records."""
    x = np.ascontiguousarray(x)
    return zlib.crc32(x.reshape(-1).view(np.uint8))


@dataclasses.dataclass(frozen=True)
class Manifest:
    config: ModelConfig
    dtype: str  # storage dtype of every tensor, DRAM part and flash store alike
    dram_bytes: int  # bytes of the DRAM-resident checkpoint's tensors
    tokenizer: str | None  # file name of the tokenizer in the model dir, if any
    source: dict[str, Any] = dataclasses.field(default_factory=dict)
    # crc32 (tensor_checksum) of each DRAM tensor: {group: {"layers_1/self_attn/q_proj/kernel":
    # crc}}; None for a format-version-1 manifest, which records none
    dram_checksums: dict[str, dict[str, int]] | None = None
    # the checksum of each bundle row in ffn/crc32.npy: "crc32c" (hardware-accelerated), or
    # "crc32" in stores written before it was
    row_checksum: str = "crc32c"
    # the FFN rows' quantization (int8/int4 values, group-wise scales), or None: rows in dtype
    quant: Quant | None = None
    # crc32 (tensor_checksum) of ffn/scales.npy, for quant.scales == "dram"
    scales_checksum: int | None = None
    # the rows' neuron order after ``flashjax place``: {"file": "ffn/order.npy", "crc32": ..,
    # and how it was fitted}; None: rows in the checkpoint's order
    order: dict[str, Any] | None = None

    @property
    def ffn_dtype(self) -> str:
        """What the flash rows hold: the storage dtype, or "int8"/"int4"."""
        return self.dtype if self.quant is None else self.quant.name

    @property
    def row_bytes(self) -> int:
        if self.quant is not None:
            return self.quant.row_bytes
        return self.config.bundle_width * DTYPE_BYTES[self.dtype]

    @property
    def scale_bytes(self) -> int:
        """Bytes of the resident row scales (quant.scales == "dram"), else 0."""
        if self.quant is None:
            return 0
        cfg = self.config
        return cfg.num_hidden_layers * cfg.ffn_dim * self.quant.scale_bytes_per_row

    @property
    def ffn_bytes_per_layer(self) -> int:
        return self.config.ffn_dim * self.row_bytes

    @property
    def ffn_bytes(self) -> int:
        return self.config.num_hidden_layers * self.ffn_bytes_per_layer

    @property
    def total_bytes(self) -> int:
        return self.dram_bytes + self.ffn_bytes + self.scale_bytes

    @property
    def format_version(self) -> int:
        if self.dram_checksums is None:
            return 1
        return FORMAT_VERSION if self.quant is not None else 2

    def to_json(self) -> dict[str, Any]:
        cfg = self.config
        d = {
            "format": FORMAT,
            "format_version": self.format_version,
            "config": cfg.to_hf_config(),
            "dtype": self.dtype,
            "layout": {
                "dram": DRAM_DIR,
                "ffn": {
                    "kind": "row_column_bundle",
                    "arrays": f"{FFN_DIR}/layer_{{layer:03d}}",
                    "shape": [cfg.ffn_dim, cfg.bundle_width],
                    "parts": {part: [i * cfg.hidden_size, (i + 1) * cfg.hidden_size]
                              for i, part in enumerate(cfg.ffn_parts)},
                    "activation": cfg.activation,
                    "row_bytes": self.row_bytes,
                    "checksums": f"{FFN_DIR}/{CHECKSUM_FILE}",
                    "row_checksum": self.row_checksum,
                },
            },
            "sizes": {"dram_bytes": self.dram_bytes,
                      "ffn_bytes_per_layer": self.ffn_bytes_per_layer,
                      "ffn_bytes": self.ffn_bytes, "total_bytes": self.total_bytes},
            "tokenizer": self.tokenizer,
            "source": self.source,
        }
        if self.dram_checksums is not None:
            d["dram_checksums"] = self.dram_checksums
        if self.quant is not None:
            ffn = d["layout"]["ffn"]
            ffn["dtype"] = self.quant.name
            ffn["quant"] = self.quant.to_json()
            if self.scales_checksum is not None:
                ffn["quant"]["scales_crc32"] = self.scales_checksum
            d["sizes"]["scale_bytes"] = self.scale_bytes
        if self.order is not None:
            d["layout"]["ffn"]["order"] = self.order
        return d

    def write(self, model_dir: Path) -> None:
        """Write ``manifest.json`` whole or not at all (a temporary file renamed over it)."""
        path = Path(model_dir) / MANIFEST
        tmp = path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def read(cls, model_dir: str | Path, check_files: bool = True) -> Manifest:
        """The manifest of ``model_dir``, every field checked (``StoreError``, or
        ``ConfigError`` for the embedded config, naming the file and the field). With
        ``check_files`` the tokenizer it names must be there too (``verify`` checks the files
        itself, to report every problem at once)."""
        model_dir = Path(model_dir)
        path = model_dir / MANIFEST
        d = _read_json(path, model_dir)
        f = _Fields(path)
        if not isinstance(d, dict):
            raise StoreError(f"{path}: expected a JSON object at the top level, found "
                             f"{_kind(d)} {_show(d)}")
        f.get(d, "format", f"{FORMAT!r}", lambda v: v == FORMAT)
        version = f.get(d, "format_version", f"one of {READABLE_VERSIONS}",
                        lambda v: _is_count(v))
        if version not in READABLE_VERSIONS:
            newer = " (written by a newer flashjax: upgrade it)" if version > FORMAT_VERSION else ""
            raise f.wrong("format_version", version, f"one of {READABLE_VERSIONS}{newer}")
        dtype = f.get(d, "dtype", f"one of {DTYPES}", lambda v: v in DTYPES)
        cfg = _config(f, d)
        template = _layer_template(cfg)
        manifest = cls(
            config=cfg, dtype=dtype,
            dram_bytes=f.get(f.obj(d, "sizes"), "dram_bytes", "a non-negative integer",
                             _is_count, field="sizes.dram_bytes"),
            tokenizer=f.get(d, "tokenizer", f"null or one of {sorted(TOKENIZERS)}",
                            lambda v: v is None or (isinstance(v, str) and v in TOKENIZERS),
                            default=None),
            source=f.get(d, "source", "an object", lambda v: isinstance(v, dict), default={}),
            dram_checksums=None if version == 1 else _dram_checksums(f, d, cfg, template),
            row_checksum=f.get(f.obj(f.obj(d, "layout"), "ffn", field="layout.ffn"),
                               "row_checksum", f"one of {ROW_CHECKSUMS}",
                               lambda v: isinstance(v, str) and v in ROW_CHECKSUMS,
                               field="layout.ffn.row_checksum",
                               default="crc32"),
            order=_order(f, d),
            **_quant(f, d, cfg, version))
        _check_sizes(f, d, manifest, template)
        if check_files:
            problems = manifest.file_problems(model_dir)
            if problems:
                raise StoreError("; ".join(problems))
        return manifest

    def file_problems(self, model_dir: str | Path) -> list[str]:
        """Files the manifest names beside the arrays (the tokenizer's) that are missing or
        not files."""
        model_dir = Path(model_dir)
        problems = []
        for name in TOKENIZERS.get(self.tokenizer, ()):
            file = model_dir / name
            if not file.exists():
                problems.append(f"{model_dir / MANIFEST}: field 'tokenizer' is "
                                f"{self.tokenizer!r}, but {file} is missing")
            elif not file.is_file():
                problems.append(f"{file}: is a directory; expected the tokenizer file that "
                                f"{model_dir / MANIFEST} field 'tokenizer' names")
        return problems


def _read_json(path: Path, model_dir: Path):
    if not path.exists():
        hint = " (it looks like a Hugging Face checkpoint: run `flashjax convert` first)" \
            if (model_dir / "config.json").exists() else ""
        raise StoreError(f"{path}: not found; {model_dir} is not a flashjax model{hint}")
    if path.is_dir():
        raise StoreError(f"{path}: is a directory; expected the manifest file (JSON)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise StoreError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise StoreError(f"{path}: cannot read ({e})") from None


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _kind(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _show(v, limit: int = 60) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class _Fields:
    """Field access with errors naming the manifest file and the field's dotted path."""

    def __init__(self, path: Path):
        self.path = path

    def wrong(self, field: str, found, expected: str) -> StoreError:
        return StoreError(f"{self.path}: field {field!r} is {_show(found)} ({_kind(found)}); "
                          f"expected {expected}")

    def get(self, obj: dict, key: str, expected: str, ok, *, field: str | None = None,
            default=dataclasses.MISSING):
        field = field or key
        if key not in obj:
            if default is not dataclasses.MISSING:
                return default
            raise StoreError(f"{self.path}: field {field!r} is missing; expected {expected}")
        value = obj[key]
        if not ok(value):
            raise self.wrong(field, value, expected)
        return value

    def obj(self, obj: dict, key: str, field: str | None = None) -> dict:
        return self.get(obj, key, "an object", lambda v: isinstance(v, dict), field=field)


def _config(f: _Fields, d: dict) -> ModelConfig:
    hf = f.obj(d, "config")
    source = f"{f.path} field 'config'"
    try:
        cfg = ModelConfig.from_hf_config(hf, source=source)
    except ConfigError as e:
        message = str(e)
        raise ConfigError(message if str(f.path) in message else f"{source}: {message}") from None
    except Exception as e:  # a value of the wrong type deep inside: int("x"), 1 // 0, ...
        raise ConfigError(f"{source}: invalid ({type(e).__name__}: {e})") from None
    try:
        hash(cfg)  # jit specialises on it
    except TypeError as e:
        raise ConfigError(f"{source}: a field holds a list or object where a number or string "
                          f"belongs ({e})") from None
    return cfg


def _layer_template(cfg: ModelConfig) -> tuple[dict[str, int], dict[str, int]]:
    """(top-level tensor path -> elements, layer 0's tensor path -> elements), from the
    converter's table (every layer has layer 0's tensors, with its own index)."""
    from flashjax.store.convert import dram_group, dram_table

    one = dataclasses.replace(cfg, num_hidden_layers=1, activation_thresholds=None)
    top, layer = {}, {}
    for e in dram_table(one, ""):
        (top if dram_group(e.path) == "top" else layer)["/".join(e.path)] = \
            int(np.prod(e.hf_shape, dtype=object))
    return top, layer


def _layer_paths(template: dict[str, int], layer: int) -> set[str]:
    return {f"layers_{layer}" + p[len("layers_0"):] for p in template}


def _layer_index(group: str) -> int | None:
    """n of a group named "layer_NNN" (as ``dram_groups`` spells it), else None."""
    m = re.fullmatch(r"layer_(\d{3,})", group)
    return int(m[1]) if m and group == f"layer_{int(m[1]):03d}" else None


def _dram_checksums(f: _Fields, d: dict, cfg: ModelConfig, template) -> dict[str, dict[str, int]]:
    field = "dram_checksums"
    checks = f.obj(d, field)
    n = cfg.num_hidden_layers
    top, layer = template
    unexpected = [g for g in checks if g != "top" and not (_layer_index(g) is not None
                                                             and _layer_index(g) < n)]
    known = len(checks) - len(unexpected)
    if unexpected or known != n + 1:
        missing = [] if "top" in checks else ["top"]
        i = 0
        while len(missing) < min(5, n + 1 - known):  # the first few; never walks all n
            if f"layer_{i:03d}" not in checks:
                missing.append(f"layer_{i:03d}")
            i += 1
        raise StoreError(f"{f.path}: field {field!r} has {len(checks)} group(s); expected "
                         f"{n + 1} ('top' and one per layer of config.num_hidden_layers {n})"
                         + (f"; missing {missing}" if missing else "")
                         + (f"; unexpected {sorted(unexpected)[:5]}" if unexpected else ""))
    out = {}
    for group, tensors in checks.items():
        where = f"{field}.{group}"
        if not isinstance(tensors, dict):
            raise f.wrong(where, tensors, "an object of tensor path: crc32")
        expected = set(top) if group == "top" else _layer_paths(layer, _layer_index(group))
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or extra:
            raise StoreError(f"{f.path}: field {where!r} does not list the tensors the config "
                             f"implies" + (f"; missing {missing[:5]}" if missing else "")
                             + (f"; unexpected {extra[:5]}" if extra else ""))
        for name, crc in tensors.items():
            if not (_is_count(crc) and crc < 1 << 32):
                raise f.wrong(f"{where}.{name}", crc, "a crc32 (an integer in [0, 2**32))")
        out[group] = dict(tensors)
    return out


def _quant(f: _Fields, d: dict, cfg: ModelConfig, version: int) -> dict:
    """The ``quant`` and ``scales_checksum`` fields of a manifest (version 3 only)."""
    ffn = f.obj(f.obj(d, "layout"), "ffn", field="layout.ffn")
    if "quant" not in ffn:
        if version == 3:
            raise StoreError(f"{f.path}: field 'layout.ffn.quant' is missing; format_version 3 "
                             f"is a store of quantized rows")
        return {}
    field = "layout.ffn.quant"
    q = f.obj(ffn, "quant", field=field)
    bits = f.get(q, "bits", "8 or 4", lambda v: v in (8, 4), field=f"{field}.bits")
    group = f.get(q, "group", "a positive integer", lambda v: _is_count(v) and v > 0,
                  field=f"{field}.group")
    scales = f.get(q, "scales", f"one of {SCALE_PLACES}", lambda v: v in SCALE_PLACES,
                   field=f"{field}.scales")
    method = f.get(q, "method", f"one of {METHODS}", lambda v: v in METHODS,
                   field=f"{field}.method", default="rtn")
    f.get(q, "scale_dtype", "'float16'", lambda v: v == "float16", field=f"{field}.scale_dtype",
          default="float16")
    try:
        quant = Quant(bits=bits, group=group, width=cfg.bundle_width, scales=scales,
                      method=method)
    except QuantError as e:
        raise StoreError(f"{f.path}: field {field!r}: {e}") from None
    f.get(ffn, "dtype", f"{quant.name!r} ({bits} bits; one of {FFN_DTYPES})",
          lambda v: v == quant.name, field="layout.ffn.dtype", default=quant.name)
    crc = None
    if scales == "dram":
        crc = f.get(q, "scales_crc32", "a crc32 (an integer in [0, 2**32))",
                    lambda v: _is_count(v) and v < 1 << 32, field=f"{field}.scales_crc32")
    for key, value in (("value_bytes", quant.value_bytes), ("row_bytes", quant.row_bytes)):
        f.get(q, key, f"{value} (from bits, group and the bundle width {cfg.bundle_width})",
              lambda v, value=value: v == value, field=f"{field}.{key}", default=value)
    return {"quant": quant, "scales_checksum": crc}


def _order(f: _Fields, d: dict) -> dict | None:
    """The ``layout.ffn.order`` field of a placed store (see ``flashjax.store.place``)."""
    ffn = f.obj(f.obj(d, "layout"), "ffn", field="layout.ffn")
    if "order" not in ffn:
        return None
    field = "layout.ffn.order"
    order = f.obj(ffn, "order", field=field)
    wanted = f"{FFN_DIR}/order.npy"
    f.get(order, "file", repr(wanted), lambda v: v == wanted, field=f"{field}.file")
    f.get(order, "crc32", "a crc32 (an integer in [0, 2**32))",
          lambda v: _is_count(v) and v < 1 << 32, field=f"{field}.crc32")
    return order


def _check_sizes(f: _Fields, d: dict, m: Manifest, template) -> None:
    """The recorded sizes and layout against those the config and dtype imply."""
    cfg, itemsize = m.config, DTYPE_BYTES[m.dtype]
    top, layer = template
    wanted = {
        "sizes.dram_bytes": (sum(top.values()) + cfg.num_hidden_layers * sum(layer.values()))
        * itemsize,
        "sizes.ffn_bytes_per_layer": m.ffn_bytes_per_layer,
        "sizes.ffn_bytes": m.ffn_bytes,
        "sizes.total_bytes": None,  # from the recorded dram_bytes, once that is checked
        "layout.ffn.row_bytes": m.row_bytes,
    }
    wanted["sizes.total_bytes"] = wanted["sizes.dram_bytes"] + m.ffn_bytes + m.scale_bytes
    why = {"sizes.dram_bytes": f"the DRAM tensors of the config in {m.dtype}",
           "layout.ffn.row_bytes": f"bundle width {cfg.bundle_width} x {itemsize} bytes "
                                   f"({m.dtype})" if m.quant is None else
                                   f"{m.quant.name} rows of {cfg.bundle_width} values"}
    ffn = f.obj(f.obj(d, "layout"), "ffn", field="layout.ffn")
    sizes = d["sizes"]
    for field, value in wanted.items():
        parent, key = (sizes, field[6:]) if field.startswith("sizes.") else (ffn, "row_bytes")
        found = f.get(parent, key, "a non-negative integer", _is_count, field=field)
        if found != value:
            raise StoreError(f"{f.path}: field {field!r} is {found}; expected {value} from the "
                             f"config and dtype"
                             + (f" ({why[field]})" if field in why else ""))
    shape = [cfg.ffn_dim, cfg.bundle_width]
    found = f.get(ffn, "shape", f"{shape} ([ffn neurons, bundle width] of the config)",
                  lambda v: isinstance(v, list) and all(_is_count(x) for x in v),
                  field="layout.ffn.shape")
    if found != shape:
        raise f.wrong("layout.ffn.shape", found,
                      f"{shape} ([ffn neurons, bundle width] of the config)")
    if "activation" in ffn and ffn["activation"] != cfg.activation:
        raise f.wrong("layout.ffn.activation", ffn["activation"],
                      f"{cfg.activation!r} (the config's)")
    parts = {p: [i * cfg.hidden_size, (i + 1) * cfg.hidden_size]
             for i, p in enumerate(cfg.ffn_parts)}
    if "parts" in ffn and ffn["parts"] != parts:
        raise f.wrong("layout.ffn.parts", ffn["parts"], f"{parts} (the config's)")
