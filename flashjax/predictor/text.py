"""Text input for activation collection and evaluation: .txt files, .jsonl files with a
``text`` field, or directories of them, turned into fixed-length token sequences."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator

import numpy as np

log = logging.getLogger(__name__)
SUFFIXES = (".txt", ".jsonl")


class TextError(ValueError):
    """Input text that cannot be used: unreadable, not UTF-8, or empty."""


def text_files(source: str | Path) -> list[Path]:
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        if not files:
            raise TextError(f"{source}: no .txt or .jsonl files")
        return files
    if not source.exists():
        raise TextError(f"{source}: no such file or directory")
    if source.suffix not in SUFFIXES:
        raise TextError(f"{source}: expected a .txt or .jsonl file (or a directory of them)")
    return [source]


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TextError(f"{path}: not UTF-8 text (invalid byte 0x{raw[e.start]:02x} at offset "
                        f"{e.start})") from None


def documents(source: str | Path) -> Iterator[str]:
    """Yield documents: a whole .txt file, or each ``text`` of a .jsonl file. A .jsonl line
    that is not valid JSON (a truncated last line, say) is skipped with a warning."""
    for path in text_files(source):
        text = _decode(path)
        if path.suffix == ".txt":
            if text.strip():
                yield text
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                log.warning("%s:%d: skipping a line that is not valid JSON (%s)", path, number, e)
                continue
            value = record.get("text") if isinstance(record, dict) else None
            if not isinstance(value, str):
                log.warning("%s:%d: skipping a record without a string 'text' field", path, number)
                continue
            if value.strip():
                yield value


def token_stream(source, tokenizer, eos_id: int) -> Iterator[int]:
    """Every document's tokens, each document followed by ``eos_id`` (OPT's separator)."""
    any_text = False
    for doc in documents(source):
        any_text = True
        yield from tokenizer.encode(doc, add_special_tokens=False).ids
        yield eos_id
    if not any_text:
        raise TextError(f"{source}: no text found")


def sequences(source, tokenizer, *, seq_len: int, bos_id: int, eos_id: int,
              max_tokens: int | None = None) -> Iterator[np.ndarray]:
    """Fixed-length sequences [seq_len] int32: bos followed by seq_len - 1 tokens of the stream.
    Stops after ``max_tokens`` tokens (counting bos) or at the end of the text (a final
    partial sequence is dropped)."""
    body = seq_len - 1
    buf: list[int] = []
    produced = 0
    for tok in token_stream(source, tokenizer, eos_id):
        buf.append(tok)
        if len(buf) == body:
            yield np.array([bos_id, *buf], np.int32)
            buf = []
            produced += seq_len
            if max_tokens is not None and produced >= max_tokens:
                return
