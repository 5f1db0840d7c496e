"""``manifest.json``: what a converted model directory holds and how it is laid out."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from flashjax.config import ModelConfig
from flashjax.store.bundles import CHECKSUM_FILE, FFN_DIR, StoreError

FORMAT = "flashjax"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DRAM_DIR = "dram"
DTYPES = ("float16", "bfloat16", "float32")
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


@dataclasses.dataclass(frozen=True)
class Manifest:
    config: ModelConfig
    dtype: str  # storage dtype of every tensor, DRAM part and flash store alike
    dram_bytes: int  # bytes of the DRAM-resident checkpoint's tensors
    tokenizer: str | None  # file name of the tokenizer in the model dir, if any
    source: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def row_bytes(self) -> int:
        return self.config.bundle_width * DTYPE_BYTES[self.dtype]

    @property
    def ffn_bytes_per_layer(self) -> int:
        return self.config.ffn_dim * self.row_bytes

    @property
    def ffn_bytes(self) -> int:
        return self.config.num_hidden_layers * self.ffn_bytes_per_layer

    @property
    def total_bytes(self) -> int:
        return self.dram_bytes + self.ffn_bytes

    def to_json(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
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
                },
            },
            "sizes": {"dram_bytes": self.dram_bytes,
                      "ffn_bytes_per_layer": self.ffn_bytes_per_layer,
                      "ffn_bytes": self.ffn_bytes, "total_bytes": self.total_bytes},
            "tokenizer": self.tokenizer,
            "source": self.source,
        }

    def write(self, model_dir: Path) -> None:
        (Path(model_dir) / MANIFEST).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def read(cls, model_dir: str | Path) -> Manifest:
        path = Path(model_dir) / MANIFEST
        if not path.exists():
            hint = " (it looks like a Hugging Face checkpoint: run `flashjax convert` first)" \
                if (Path(model_dir) / "config.json").exists() else ""
            raise StoreError(f"{path}: not found; {model_dir} is not a flashjax model{hint}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise StoreError(f"{path}: not valid JSON ({e})") from None
        if d.get("format") != FORMAT or d.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{path}: format {d.get('format')!r} version "
                             f"{d.get('format_version')!r}; expected {FORMAT!r} {FORMAT_VERSION}")
        if d.get("dtype") not in DTYPES:
            raise StoreError(f"{path}: field 'dtype' is {d.get('dtype')!r}; expected one of {DTYPES}")
        return cls(config=ModelConfig.from_hf_config(d["config"], source=f"{path} config"),
                   dtype=d["dtype"], dram_bytes=int(d["sizes"]["dram_bytes"]),
                   tokenizer=d.get("tokenizer"), source=d.get("source", {}))
