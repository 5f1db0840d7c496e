"""The shipped models: small models trained on the documentation corpus, with their tokenizer
and trained predictors: ``opt`` (the default, a ReLU OPT) and ``llama`` (a SwiGLU Llama
relufied with ``scripts/relufy.py``).

The repository holds each once, in Hugging Face format, in ``checkpoints/``; a built wheel (and
so a non-editable ``pip install .``) carries a copy as package data in ``flashjax/_shipped/``
(``setup.py`` puts it there), an editable install finds ``checkpoints/`` next to the source.
The flash store is made from it on first use in a cache directory (``$FLASHJAX_CACHE``,
default ``~/.cache/flashjax``) and reused afterwards.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import flashjax

PACKAGED = Path(__file__).resolve().parent / "_shipped"  # in an installed wheel
CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"  # in a source tree


SHIPPED = {"opt": "flashjax-docs-9m", "llama": "flashjax-docs-llama-9m"}  # name: directory
DEFAULT = "opt"


def shipped_checkpoint(name: str = DEFAULT) -> Path:
    """The shipped Hugging Face checkpoint directory of model ``name`` (one of ``SHIPPED``):
    the installed package's copy, else the one in the source tree's ``checkpoints/``."""
    if name not in SHIPPED:
        raise ValueError(f"no shipped model named {name!r}; the shipped models are "
                         f"{', '.join(SHIPPED)}")
    for root in (PACKAGED, CHECKPOINTS):
        if (root / SHIPPED[name] / "config.json").is_file():
            return root / SHIPPED[name]
    raise FileNotFoundError(f"no shipped model {SHIPPED[name]} in {PACKAGED} (an installed "
                            f"wheel's) nor in {CHECKPOINTS} (a source tree's); install "
                            f"flashjax from a wheel or a clone (`pip install .`), or pass a "
                            f"MODEL_DIR")


def cache_root() -> Path:
    return Path(os.environ.get("FLASHJAX_CACHE", Path.home() / ".cache" / "flashjax"))


def _fingerprint(hf_dir: Path) -> str:
    """Of the checkpoint's files and the store format: a new format converts again."""
    from flashjax.store.manifest import FORMAT_VERSION

    h = hashlib.sha256(f"format {FORMAT_VERSION}".encode())
    for name in ("config.json", "model.safetensors", "predictors/metrics.json"):
        path = hf_dir / name
        if path.exists():
            h.update(name.encode())
            h.update(str(path.stat().st_size).encode())
            h.update(path.read_bytes() if path.stat().st_size < 1 << 20 else
                     hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:12]


def converted_dir(hf_dir: Path) -> Path:
    """Where the shipped checkpoint ``hf_dir`` is (or will be) converted."""
    return cache_root() / f"{hf_dir.name}-{_fingerprint(hf_dir)}"


def default_model_dir(progress: bool = True, name: str = DEFAULT) -> Path:
    """The converted shipped model ``name``, converting it on first use."""
    hf_dir = shipped_checkpoint(name)
    out = converted_dir(hf_dir)
    if not out.exists():
        if progress:
            print(f"converting the shipped model {hf_dir.name} into {out} (once)",
                  file=sys.stderr)
        flashjax.convert(hf_dir, out, dtype="float16", progress=progress)
    return out
