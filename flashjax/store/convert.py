"""Hugging Face checkpoint (OPT, Llama, Mistral, Qwen2) -> flashjax model directory.

The conversion is a table: each flashjax parameter names its HF tensor and a transform. Every
key and shape is checked before anything is written; tensors are then read one at a time, the
FFN of one layer at a time, so peak memory is about the DRAM part plus one layer's FFN. Output
goes to a hidden sibling directory ``.{name}.partial-{pid}`` that is renamed into place only
when complete; one left behind by a process that no longer runs is removed by the next
conversion into the same parent directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import re
import shutil
import signal
import threading
from pathlib import Path
from typing import Callable

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from flashjax.config import ConfigError, LlamaConfig, ModelConfig, OPTConfig
from flashjax.store import bundles, quant
from flashjax.store.hf import CheckpointError, HFCheckpoint
from flashjax.store.manifest import DRAM_DIR, DTYPES, Manifest, dram_groups, tensor_checksum

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")
PREDICTORS = "predictors"
NP_DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16),
             "float32": np.dtype(np.float32)}


@dataclasses.dataclass(frozen=True)
class Entry:
    """flashjax parameter ``path`` <- HF tensor ``key`` of HF shape ``hf_shape``, via ``fn``."""

    path: tuple[str, ...]
    key: str
    hf_shape: tuple[int, ...]
    fn: Callable[[np.ndarray], np.ndarray] = lambda w: w


def _transpose(w):
    return w.T


def _linear(shape_in: tuple[int, ...], shape_out: tuple[int, ...]):
    """torch Linear weight [out, in] -> Flax kernel [*shape_in, *shape_out]."""
    return lambda w: w.T.reshape(*shape_in, *shape_out)


def dram_table(cfg: ModelConfig, prefix: str) -> list[Entry]:
    """Every DRAM-resident parameter of the model and where it comes from."""
    return (_opt_table if cfg.family == "opt" else _llama_table)(cfg, prefix)


def _opt_table(cfg: OPTConfig, prefix: str) -> list[Entry]:
    d, p, v, n = cfg.hidden_size, cfg.word_embed_proj_dim, cfg.vocab_size, cfg.ffn_dim
    heads = (cfg.num_attention_heads, cfg.head_dim)
    t = [Entry(("embed_tokens", "embedding"), f"{prefix}embed_tokens.weight", (v, p)),
         Entry(("embed_positions", "embedding"), f"{prefix}embed_positions.weight",
               (cfg.max_position_embeddings + cfg.POSITION_OFFSET, d))]
    if cfg.has_projections:
        t += [Entry(("project_in", "kernel"), f"{prefix}project_in.weight", (d, p), _transpose),
              Entry(("project_out", "kernel"), f"{prefix}project_out.weight", (p, d), _transpose)]
    if cfg.has_final_layer_norm:
        t += [Entry(("final_layer_norm", "scale"), f"{prefix}final_layer_norm.weight", (d,)),
              Entry(("final_layer_norm", "bias"), f"{prefix}final_layer_norm.bias", (d,))]
    if not cfg.tie_word_embeddings:
        t += [Entry(("lm_head", "kernel"), "lm_head.weight", (v, p), _transpose)]
    for i in range(cfg.num_hidden_layers):
        hf, me = f"{prefix}layers.{i}.", f"layers_{i}"
        for proj in ("q_proj", "k_proj", "v_proj"):
            t += [Entry((me, "self_attn", proj, "kernel"), f"{hf}self_attn.{proj}.weight", (d, d),
                        _linear((d,), heads)),
                  Entry((me, "self_attn", proj, "bias"), f"{hf}self_attn.{proj}.bias", (d,),
                        lambda w: w.reshape(heads))]
        t += [Entry((me, "self_attn", "out_proj", "kernel"), f"{hf}self_attn.out_proj.weight",
                    (d, d), _linear(heads, (d,))),
              Entry((me, "self_attn", "out_proj", "bias"), f"{hf}self_attn.out_proj.bias", (d,))]
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            t += [Entry((me, norm, "scale"), f"{hf}{norm}.weight", (d,)),
                  Entry((me, norm, "bias"), f"{hf}{norm}.bias", (d,))]
        # The FFN biases are small and stay in DRAM; the weights go to the flash store.
        t += [Entry((me, "ffn", "fc1", "bias"), f"{hf}fc1.bias", (n,)),
              Entry((me, "ffn", "fc2", "bias"), f"{hf}fc2.bias", (d,))]
    return t


def _llama_table(cfg: LlamaConfig, prefix: str) -> list[Entry]:
    d, v, k = cfg.hidden_size, cfg.vocab_size, cfg.head_dim
    heads, kv_heads = (cfg.num_attention_heads, k), (cfg.num_key_value_heads, k)
    t = [Entry(("embed_tokens", "embedding"), f"{prefix}embed_tokens.weight", (v, d)),
         Entry(("norm", "scale"), f"{prefix}norm.weight", (d,))]
    if not cfg.tie_word_embeddings:
        t += [Entry(("lm_head", "kernel"), "lm_head.weight", (v, d), _transpose)]
    for i in range(cfg.num_hidden_layers):
        hf, me = f"{prefix}layers.{i}.", f"layers_{i}"
        for proj, shape in (("q_proj", heads), ("k_proj", kv_heads), ("v_proj", kv_heads)):
            width = shape[0] * shape[1]
            t += [Entry((me, "self_attn", proj, "kernel"), f"{hf}self_attn.{proj}.weight",
                        (width, d), _linear((d,), shape))]
            if cfg.qkv_bias:
                t += [Entry((me, "self_attn", proj, "bias"), f"{hf}self_attn.{proj}.bias",
                            (width,), lambda w, shape=shape: w.reshape(shape))]
        t += [Entry((me, "self_attn", "o_proj", "kernel"), f"{hf}self_attn.o_proj.weight",
                    (d, heads[0] * k), _linear(heads, (d,)))]
        if cfg.o_bias:
            t += [Entry((me, "self_attn", "o_proj", "bias"), f"{hf}self_attn.o_proj.bias", (d,))]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            t += [Entry((me, norm, "scale"), f"{hf}{norm}.weight", (d,))]
    return t


def ffn_keys(cfg: ModelConfig, prefix: str, layer: int) -> dict[str, tuple[int, int]]:
    """HF FFN weight names of one layer in ``cfg.ffn_parts`` order, and their shapes (torch
    Linear: [out, in])."""
    n, d = cfg.ffn_dim, cfg.hidden_size
    hf = f"{prefix}layers.{layer}."
    if cfg.family == "opt":
        return {f"{hf}fc1.weight": (n, d), f"{hf}fc2.weight": (d, n)}
    return {f"{hf}mlp.gate_proj.weight": (n, d), f"{hf}mlp.up_proj.weight": (n, d),
            f"{hf}mlp.down_proj.weight": (d, n)}


def bundle_rows(*weights: np.ndarray) -> np.ndarray:
    """HF FFN weights in part order -> bundle rows: row i = [each input part's weight row i,
    the down projection's column i] (OPT: [fc1.weight[i, :], fc2.weight[:, i]]; gated:
    [gate_proj.weight[i, :], up_proj.weight[i, :], down_proj.weight[:, i]])."""
    return np.concatenate([*weights[:-1], weights[-1].T], axis=1)


_PREFIXES = {"opt": ("model.decoder.", "decoder."), "llama": ("model.",)}


def _prefix(cfg: ModelConfig, keys: set[str]) -> str:
    for prefix in _PREFIXES[cfg.family]:
        if f"{prefix}embed_tokens.weight" in keys:
            return prefix
    wanted = " or ".join(f"'{p}embed_tokens.weight'" for p in _PREFIXES[cfg.family])
    raise CheckpointError(f"no {wanted} tensor: not a {cfg.model_type} checkpoint")


def _check(ckpt: HFCheckpoint, cfg: ModelConfig, prefix: str, table: list[Entry]) -> None:
    """Every tensor present with the shape the config implies; report all problems at once."""
    wanted = {e.key: e.hf_shape for e in table}
    for layer in range(cfg.num_hidden_layers):
        wanted.update(ffn_keys(cfg, prefix, layer))
    keys = ckpt.keys()
    problems = [f"tensor {k!r} is missing" for k in wanted if k not in keys]
    problems += [f"tensor {k!r} has shape {ckpt.shape(k)}, expected {s} from config.json"
                 for k, s in wanted.items() if k in keys and ckpt.shape(k) != s]
    if problems:
        raise CheckpointError(f"{ckpt.dir}: " + "; ".join(problems[:10])
                              + (f"; and {len(problems) - 10} more" if len(problems) > 10 else ""))
    extra = keys - set(wanted) - {"lm_head.weight"}
    if extra:
        log.warning("%s: ignoring %d tensor(s) flashjax does not use: %s", ckpt.dir, len(extra),
                    sorted(extra)[:5])


def _source_dtype(ckpt: HFCheckpoint, prefix: str) -> str:
    found = ckpt.dtype(f"{prefix}embed_tokens.weight")
    return {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}.get(found, "float32")


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


class FFNWriter:
    """Writes a new store's FFN layer by layer: the rows as they are, or quantized
    (``q``, with per-layer ``mse`` weights from ``feature_sq`` [layers, D]); then the row
    checksums and, for scales="dram", the scales."""

    def __init__(self, out: Path, cfg: ModelConfig, q: quant.Quant | None = None,
                 feature_sq: np.ndarray | None = None):
        self.out, self.cfg, self.q, self.feature_sq = out, cfg, q, feature_sq
        self.checksums = np.zeros((cfg.num_hidden_layers, cfg.ffn_dim), np.uint32)
        self.scales = (np.zeros((cfg.num_hidden_layers, cfg.ffn_dim, q.groups), np.float16)
                       if q is not None and q.scales == "dram" else None)
        self.context = bundles.write_context()
        (out / bundles.FFN_DIR).mkdir()

    def layer(self, layer: int, rows: np.ndarray) -> None:
        if self.q is not None:
            weights = None if self.feature_sq is None else \
                quant.input_weights(self.cfg, self.feature_sq[layer])
            rows, scales = quant.encode(rows, self.q, weights)
            if self.scales is not None:
                self.scales[layer] = scales
        with _sigint_deferred():
            bundles.create_layer(self.out, layer, rows, self.context)
        self.checksums[layer] = bundles.row_checksums(rows)

    def finish(self) -> dict:
        """Write the checksums (and scales); the manifest fields they imply."""
        np.save(self.out / bundles.FFN_DIR / bundles.CHECKSUM_FILE, self.checksums)
        if self.q is None:
            return {}
        crc = None
        if self.scales is not None:
            np.save(self.out / bundles.FFN_DIR / quant.SCALES_FILE, self.scales)
            crc = tensor_checksum(self.scales)
        return {"quant": self.q, "scales_checksum": crc}


def quant_layout(cfg: ModelConfig, ffn_dtype: str | None, *, group: int | None = None,
                 scales: str | None = None, method: str = "rtn",
                 feature_sq: np.ndarray | None = None) -> quant.Quant | None:
    """The quantization of a store's rows for ``ffn_dtype`` ("int8", "int4"; None: rows in
    the store's dtype); ``method`` "mse" needs ``feature_sq``."""
    if ffn_dtype is None:
        if group is not None or scales is not None or method != "rtn":
            raise ValueError("group, scales and method apply to an int8 or int4 ffn_dtype only")
        return None
    if method == "mse" and feature_sq is None:
        raise ValueError("method 'mse' weights the rounding error by the FFN inputs' mean "
                         "squares: give calibration data (`flashjax collect` output)")
    if method == "rtn" and feature_sq is not None:
        raise ValueError("calibration data is used by method 'mse' only")
    return quant.Quant.for_model(ffn_dtype, cfg, group=group, scales=scales, method=method)


def convert(hf_dir: str | Path, out_dir: str | Path, dtype: str | None = None,
            progress: bool = True, activation: str | None = None, *,
            ffn_dtype: str | None = None, group: int | None = None,
            scales: str | None = None) -> Manifest:
    """Convert the Hugging Face checkpoint in ``hf_dir`` (OPT, or Llama, Mistral or Qwen2
    with ReLU) into ``out_dir``.

    ``dtype`` (float16, bfloat16, float32) is the storage type of every tensor; by default the
    checkpoint's own. ``activation`` "drelu" marks a gated model whose FFN is
    relu(gate) * relu(up) (TurboSparse; its config cannot say so in a form transformers
    reads); by default the config's. ``out_dir`` must not exist.

    ``ffn_dtype`` "int8" or "int4" stores the FFN rows quantized, round to nearest (see
    ``flashjax.store.quant``; ``group`` values per scale, ``scales`` "row" or "dram"); the
    DRAM part keeps ``dtype``. ``flashjax.quantize`` requantizes a converted store, also with
    scales fitted to calibration data.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"output directory {out_dir} already exists; choose a new path "
                              f"or remove it first")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {DTYPES}")
    cfg = ModelConfig.from_json_file(hf_dir / "config.json")
    if activation is not None and activation != cfg.activation:
        try:
            cfg = dataclasses.replace(cfg, activation=activation)
        except ConfigError as e:
            raise ConfigError(f"{hf_dir / 'config.json'}: {e}") from None
    if cfg.activation == "silu" and cfg.activation_thresholds is None:
        log.warning("%s: hidden_act silu (SwiGLU): no neuron is ever exactly inactive; run "
                    "`flashjax calibrate` on the converted model for activation sparsity",
                    hf_dir / "config.json")
    ckpt = HFCheckpoint(hf_dir)
    prefix = _prefix(cfg, ckpt.keys())
    table = dram_table(cfg, prefix)
    _check(ckpt, cfg, prefix, table)
    dtype = dtype or _source_dtype(ckpt, prefix)
    np_dtype = NP_DTYPES[dtype]
    q = quant_layout(cfg, ffn_dtype, group=group, scales=scales)

    tmp = new_partial(out_dir)
    checkpointer = ocp.StandardCheckpointer()  # one for every group, closed before tmp goes
    try:
        ffn = FFNWriter(tmp, cfg, q)
        dram_bytes = 0
        dram_checksums: dict[str, dict[str, int]] = {}
        # One orbax checkpoint per DRAM group (orbax copies a tree while saving it, so saving
        # the whole DRAM part at once would double its memory); each layer's FFN goes to the
        # flash store in the same pass.
        for group in tqdm(dram_groups(cfg), desc="convert", unit="group", disable=not progress):
            tree: dict = {}
            crcs = dram_checksums[group] = {}
            for e in table:
                if dram_group(e.path) == group:
                    x = np.ascontiguousarray(e.fn(ckpt.get(e.key)).astype(np_dtype))
                    crcs["/".join(e.path)] = tensor_checksum(x)  # of the very bytes saved
                    _set(tree, e.path, x)
            dram_bytes += sum(x.nbytes for x in jax.tree.leaves(tree))
            save_dram_group(tmp, group, tree, checkpointer)
            del tree
            if group != "top":
                layer = int(group.split("_")[1])
                rows = bundle_rows(*(ckpt.get(k) for k in ffn_keys(cfg, prefix, layer)))
                # (quantized from the checkpoint's own values, not from dtype's rounding)
                ffn.layer(layer, rows if q is not None else rows.astype(np_dtype, copy=False))
                del rows
        quant_fields = ffn.finish()
        tokenizer = None
        for name in TOKENIZER_FILES:
            if (hf_dir / name).exists():
                shutil.copy2(hf_dir / name, tmp / name)
        if (hf_dir / PREDICTORS).is_dir():  # trained predictors shipped beside the weights
            shutil.copytree(hf_dir / PREDICTORS, tmp / PREDICTORS)
        if (hf_dir / "tokenizer.json").exists():
            tokenizer = "tokenizer.json"
        elif (hf_dir / "vocab.json").exists() and (hf_dir / "merges.txt").exists():
            tokenizer = "vocab.json"
        manifest = Manifest(config=cfg, dtype=dtype, dram_bytes=dram_bytes, tokenizer=tokenizer,
                            source={"path": str(hf_dir.absolute()),
                                    "files": sorted({p.name for p in ckpt.files.values()})},
                            dram_checksums=dram_checksums, **quant_fields)
        checkpointer.close()
        manifest.write(tmp)  # written last: a directory without it never loads
        _publish(tmp, out_dir)
    except BaseException:
        # A save may still be in flight (an error between orbax's save and its wait): let
        # its threads finish before removing the directory they write into. A Ctrl-C during
        # this wait leaves the directory to the next conversion's stale cleanup.
        try:
            checkpointer.close()
        except Exception as e:  # the abandoned save's own error: of no interest now
            log.debug("closing the checkpointer of an abandoned conversion: %s", e)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished ``tmp`` to ``out_dir``, unless another conversion got there first."""
    lost = FileExistsError(f"another conversion finished {out_dir} first; this conversion's "
                           f"output was discarded and {out_dir} left as it is")
    if out_dir.exists():
        raise lost
    try:
        os.rename(tmp, out_dir)
    except OSError as e:  # it appeared since: rename(2) refuses a non-empty directory
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise lost from None
        raise


def new_partial(out_dir: Path) -> Path:
    """A new, empty hidden sibling ``.{name}.partial-{pid}`` of ``out_dir`` to write into and
    rename into place when complete; stale ones of processes gone are removed first."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out_dir.parent)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def link_or_copy(src, dst) -> None:
    """A hard link of file ``src`` at ``dst``, or a copy where the file system refuses."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def carry_over(src: Path, dst: Path, skip, skip_hidden: bool = False) -> None:
    """The entries of directory ``src`` but those named in ``skip`` (and, with
    ``skip_hidden``, those whose name starts with a dot) into ``dst``: files and directory
    trees as hard links where possible (``link_or_copy``)."""
    for entry in Path(src).iterdir():
        if entry.name in skip or (skip_hidden and entry.name.startswith(".")):
            continue
        if entry.is_dir():
            shutil.copytree(entry, dst / entry.name, copy_function=link_or_copy)
        else:
            link_or_copy(entry, dst / entry.name)


_PARTIAL = re.compile(r"\..+\.partial-(\d+)")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except (OverflowError, OSError):  # no such pid can exist: not ours to judge, keep it
        return True
    return True


def remove_stale_partials(parent: Path) -> list[Path]:
    """Remove the ``.{name}.partial-{pid}`` directories in ``parent`` left by conversions (or
    exports) whose process no longer runs; return them. Those of live processes stay."""
    stale = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return stale
    for path in entries:
        m = _PARTIAL.fullmatch(path.name)
        if m is None or path.is_symlink() or not path.is_dir():
            continue
        pid = int(m[1])
        if pid <= 0 or pid == os.getpid() or _process_alive(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)
        stale.append(path)
    if stale:
        log.warning("removed %d partial output(s) of interrupted conversions whose process is "
                    "gone: %s", len(stale), ", ".join(str(p) for p in stale))
    return stale


def dram_group(path: tuple[str, ...]) -> str:
    """The DRAM checkpoint a parameter is saved in: its layer's, or "top"."""
    return f"layer_{int(path[0].split('_')[1]):03d}" if path[0].startswith("layers_") else "top"


@contextlib.contextmanager
def _sigint_deferred():
    """Hold a Ctrl-C back until the block is done, then raise its KeyboardInterrupt.

    Writes cut short leave threads writing into the partial directory after it is removed:
    orbax's ``save`` starts threads (metadata, commits) that only the finished call hands to
    the checkpointer, an interrupted ``Thread.join`` marks a running thread stopped (CPython
    3.11) so the checkpointer cannot wait for it either, and TensorStore writes on in C++.
    So a save, or a layer's FFN write, always completes (a second or so per layer at 7B).
    Only in the main thread, and only while Python's own SIGINT handler is set."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def save_dram_group(model_dir: Path, group: str, tree: dict, checkpointer=None) -> None:
    """Save one DRAM group and wait for it (orbax holds a copy of the tree until done)."""
    own = checkpointer is None
    checkpointer = checkpointer or ocp.StandardCheckpointer()
    with _sigint_deferred():
        checkpointer.save((model_dir / DRAM_DIR / group).absolute(), tree)
        checkpointer.wait_until_finished()
    if own:
        checkpointer.close()

