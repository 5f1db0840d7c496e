"""Tensor-by-tensor access to a Hugging Face safetensors checkpoint (single file or sharded)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A Hugging Face checkpoint that is incomplete or does not match its config."""


class HFCheckpoint:
    """Maps tensor names to their safetensors file; reads one tensor at a time.

    Files are opened per read so the process never keeps a whole checkpoint mapped.
    """

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        if (self.dir / INDEX).exists():
            try:
                weight_map = json.loads((self.dir / INDEX).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{self.dir / INDEX}: unreadable index ({e!r})") from None
            self.files = {k: self.dir / v for k, v in weight_map.items()}
        elif (self.dir / SINGLE).exists():
            self.files = dict.fromkeys(self._keys_of(self.dir / SINGLE), self.dir / SINGLE)
        else:
            raise CheckpointError(f"{self.dir}: neither {SINGLE} nor {INDEX} found "
                                  f"(only safetensors checkpoints are read)")
        for path in sorted(set(self.files.values())):
            if not path.exists():
                raise CheckpointError(f"{path}: listed in {INDEX} but missing")

    @staticmethod
    def _keys_of(path: Path) -> list[str]:
        try:
            with safe_open(str(path), framework="numpy") as f:
                return list(f.keys())
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None

    def keys(self) -> set[str]:
        return set(self.files)

    def _file(self, key: str) -> Path:
        try:
            return self.files[key]
        except KeyError:
            raise CheckpointError(f"{self.dir}: tensor {key!r} is missing") from None

    def shape(self, key: str) -> tuple[int, ...]:
        with safe_open(str(self._file(key)), framework="numpy") as f:
            return tuple(f.get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        with safe_open(str(self._file(key)), framework="numpy") as f:
            return f.get_slice(key).get_dtype()

    def get(self, key: str) -> np.ndarray:
        path = self._file(key)
        try:
            with safe_open(str(path), framework="numpy") as f:
                return f.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tensor {key!r} ({e})") from None
