"""The flashjax command line: parses arguments and calls the Python API."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

from flashjax.store.quant import FFN_DTYPES, METHODS, SCALE_PLACES


class UsageError(ValueError):
    """Arguments that do not fit the model: printed as ``error: ...``, exit status 2."""


def _number(kind, low=None, high=None, low_open=False):
    """An argparse type: ``kind`` (int or float) within [low, high] (``low_open``: > low)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if low_open else '>='} {low}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text} must be <= {high}")
        return value
    return parse


def _budget(text: str) -> str:
    from flashjax.budget import parse_budget

    try:
        parse_budget(text, 10**12)  # the syntax and range now; the bytes once the model is known
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("is not valid UTF-8 text") from None
    return text


_POSITIVE = _number(int, 1)


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, "
                                         f"got {text!r}") from None
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"expected integers >= 0, got {text!r}")
    return ids


def _size(text: str) -> int:
    """Bytes: an integer or a size with a unit ("6GB", "512MiB")."""
    from flashjax.budget import MIN_BYTES, parse_budget

    if text.strip().endswith("%"):
        raise argparse.ArgumentTypeError(f"{text!r}: give bytes or a size such as 6GB")
    try:
        try:  # 6700000000, 6.7e9
            value = int(float(text)) if float(text) >= MIN_BYTES else parse_budget(text, 1)
        except ValueError:
            value = parse_budget(text, 1)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value < MIN_BYTES:
        raise argparse.ArgumentTypeError(f"{text!r}: at least {MIN_BYTES} bytes")
    return value


def _memory_limit(text: str):
    return "auto" if text.strip().lower() == "auto" else _size(text)


def _windows(text: str) -> list[int]:
    ks = _parse_ids(text)
    if min(ks) < 1:
        raise argparse.ArgumentTypeError(f"window sizes must be >= 1, got {text!r}")
    return ks


def cmd_convert(args) -> int:
    import flashjax

    t0 = time.perf_counter()
    manifest = flashjax.convert(args.hf_dir, args.out_dir, dtype=args.dtype,
                                activation=args.activation, ffn_dtype=args.ffn_dtype,
                                group=args.group, scales=args.scales)
    _print_written(args.out_dir, manifest, time.perf_counter() - t0)
    return 0


def _print_written(out_dir, manifest, seconds: float) -> None:
    q = manifest.quant
    rows = f"{manifest.ffn_dtype} rows of {manifest.row_bytes} B" + (
        f" (groups of {q.group}, scales {'in the rows' if q.scales == 'row' else 'resident'}, "
        f"{q.method})" if q is not None else "")
    print(f"wrote {out_dir}: {manifest.dtype}, DRAM part {manifest.dram_bytes / 1e6:.1f} MB, "
          f"flash FFN {manifest.ffn_bytes / 1e6:.1f} MB in {manifest.config.num_hidden_layers} "
          f"layers, {rows} ({seconds:.1f} s)", file=sys.stderr)


def cmd_quantize(args) -> int:
    import flashjax

    t0 = time.perf_counter()
    manifest = flashjax.quantize(args.model_dir, args.out_dir, args.ffn_dtype,
                                 method=args.method, data=args.data, tokens=args.tokens,
                                 group=args.group, scales=args.scales)
    _print_written(args.out_dir, manifest, time.perf_counter() - t0)
    return 0


def cmd_place(args) -> int:
    from flashjax.store.place import METHODS as PLACE_METHODS, place_store, report, scores_json

    t0 = time.perf_counter()
    methods = tuple(args.methods.split(",")) if args.methods else PLACE_METHODS
    manifest, placements = place_store(args.model_dir, data=args.data, trace=args.trace,
                                       out_dir=args.out, methods=methods, tokens=args.tokens,
                                       window=args.window, gap=args.gap)
    print(report(placements))
    if args.scores:
        Path(args.scores).write_text(scores_json(placements) + "\n")
    where = args.out or args.model_dir
    print(f"placed {where}: orders {', '.join(p.method for p in placements)} "
          f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


def _predictor(text: str):
    return None if text in ("none", "None") else text


def _use_shipped_model(args, progress: bool) -> None:
    """No MODEL_DIR: the shipped model, flash-backed (lowrank) at half its DRAM size, sampled
    unless a temperature is given (a 7M-parameter model loops when greedy)."""
    from flashjax.shipped import DEFAULT, default_model_dir

    args.model_dir = str(default_model_dir(progress=progress, name=args.model or DEFAULT))
    args.dram_budget = args.dram_budget or "50%"
    if getattr(args, "temperature", 0) is None:
        args.temperature, args.top_p = 0.8, 0.9 if args.top_p is None else args.top_p


def _is_flash(args) -> bool:
    return args.dram_budget is not None or args.predictor is not None


def _load_kwargs(args, max_context: int) -> dict:
    """``flashjax.load``'s keyword arguments from the model-loading options: flash-backed when
    --dram-budget or --predictor is given, its KV cache reserved for ``max_context`` tokens."""
    if not _is_flash(args):
        if args.no_verify_reads:
            raise UsageError("--no-verify-reads is for flash mode: give --dram-budget too")
        return {}
    kw = dict(dram_budget=args.dram_budget or 1.0, window=args.window,
              direct_io=not args.page_cache, verify_reads=not args.no_verify_reads,
              max_context=max_context)
    if args.predictor is not None:
        kw["predictor"] = _predictor(args.predictor)
    return kw


def cmd_generate(args) -> int:
    import flashjax

    if args.model_dir is None:  # the shipped model: flash-backed, lowrank, half the DRAM
        _use_shipped_model(args, progress=not args.json)
        if args.prompt is None and args.prompt_ids is None:
            args.prompt = "The Python interpreter"
    if args.prompt is None and args.prompt_ids is None:
        raise UsageError("give --prompt or --prompt-ids")
    # everything that can be checked without the weights, before the (long) load
    from flashjax.runtime import encode
    from flashjax.store.load import load_tokenizer
    from flashjax.store.manifest import Manifest

    manifest = Manifest.read(args.model_dir)
    cfg = manifest.config
    if args.prompt_ids is not None:
        prompt = args.prompt_ids
        if max(prompt) >= cfg.vocab_size:
            raise UsageError(f"--prompt-ids: token id {max(prompt)} is outside the "
                             f"model's vocabulary [0, {cfg.vocab_size})")
    else:
        tokenizer = load_tokenizer(args.model_dir, manifest)
        if tokenizer is None:
            raise UsageError(f"{args.model_dir} has no tokenizer; use --prompt-ids")
        prompt = encode(tokenizer, cfg, args.prompt)
    need = len(prompt) + args.max_new_tokens
    if need > cfg.max_sequence:
        raise UsageError(f"the prompt's {len(prompt)} tokens + --max-new-tokens "
                         f"{args.max_new_tokens} exceed the model's {cfg.sequence_limit}")
    flash = _is_flash(args)
    if flash and args.max_context is not None and args.max_context < need - 1:
        raise UsageError(f"--max-context {args.max_context} is less than the prompt's "
                         f"{len(prompt)} tokens + --max-new-tokens {args.max_new_tokens} - 1")
    if not flash and (args.max_context is not None or args.no_verify_reads):
        raise UsageError("--max-context and --no-verify-reads are for flash mode: "
                         "give --dram-budget too")
    kw = _load_kwargs(args, args.max_context or need - 1)
    model = flashjax.load(args.model_dir, progress=not args.json, **kw)
    printer = None if args.json else _TokenPrinter(model, args.prompt)
    t0 = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature or 0.0, top_k=args.top_k,
                         top_p=1.0 if args.top_p is None else args.top_p,
                         seed=args.seed, on_token=printer,
                         **({"return_stats": True} if flash else {}))
    new, stats = out if flash else (out, None)
    seconds = time.perf_counter() - t0
    text = model.decode(new) if model.tokenizer is not None else None
    if args.json:
        result = {"token_ids": new, "text": text, "prompt_ids": prompt, "seconds": seconds,
                  "seed": args.seed}
        if stats is not None:
            result["stats"] = stats
        print(json.dumps(result))
        return 0
    printer.close(new)
    sampled = f", sampled with seed {args.seed}" if args.temperature else ""
    print(f"[{len(new)} tokens in {seconds:.2f} s{sampled}]", file=sys.stderr)
    if stats is not None:
        print(latency_table(stats), file=sys.stderr)
    return 0


def _load_for_turns(args, command: str):
    """``chat``'s and ``serve``'s model: MODEL_DIR (default: the shipped one), with its
    tokenizer, the KV cache sized for --max-context tokens (default: the model's limit).
    Returns (model, the name it goes by)."""
    import flashjax
    from flashjax.store.manifest import Manifest

    name = None
    if args.model_dir is None:
        from flashjax.shipped import shipped_checkpoint

        name = shipped_checkpoint(args.model or "opt").name
        _use_shipped_model(args, progress=True)
    manifest = Manifest.read(args.model_dir)
    cfg = manifest.config
    if manifest.tokenizer is None:
        raise UsageError(f"{args.model_dir} has no tokenizer; {command} needs one")
    if args.max_context is not None and args.max_context > cfg.max_sequence:
        raise UsageError(f"--max-context {args.max_context} exceeds the model's "
                         f"{cfg.sequence_limit}")
    kw = _load_kwargs(args, args.max_context or cfg.max_sequence)
    print(f"loading {args.model_dir}" + (f" (flash-backed, DRAM budget {kw['dram_budget']})"
                                         if kw else ""), file=sys.stderr)
    model = flashjax.load(args.model_dir, **kw)
    return model, name or Path(args.model_dir).name


def cmd_chat(args) -> int:
    from flashjax.chat import ChatFormat, chat_loop

    model, _ = _load_for_turns(args, "chat")
    fmt = ChatFormat.from_model_dir(args.model_dir)
    with model.conversation(max_context=args.max_context) as conversation:
        return chat_loop(model, conversation, fmt, max_new_tokens=args.max_new_tokens,
                         system=args.system, temperature=args.temperature or 0.0,
                         top_k=args.top_k, top_p=1.0 if args.top_p is None else args.top_p,
                         seed=args.seed)


def cmd_serve(args) -> int:
    import importlib.util

    missing = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"serve needs {' and '.join(missing)}: pip install 'flashjax[serve]'")
    from flashjax.serve import serve

    model, name = _load_for_turns(args, "serve")
    name = args.model_name or name
    print(f"serving {args.model_dir} as {name!r} on http://{args.host}:{args.port}/v1 "
          f"(requests one at a time)", file=sys.stderr)
    serve(model, name=name, host=args.host, port=args.port, max_context=args.max_context,
          log_level=args.log_level)
    return 0


class _TokenPrinter:
    """Prints a generation as it goes: the text decoded so far (or the ids), each new piece
    as soon as its token is chosen."""

    def __init__(self, model, prompt_text):
        self.model, self.shown = model, ""
        self.text = model.tokenizer is not None
        if self.text and prompt_text:
            sys.stdout.write(prompt_text)
            sys.stdout.flush()

    def __call__(self, ids, final: bool = False) -> None:
        if self.text:
            now = self.model.decode(ids)
            # (a piece ending in U+FFFD is a character whose bytes are still to come)
            if now.startswith(self.shown) and (final or not now.endswith("\ufffd")):
                sys.stdout.write(now[len(self.shown):])
                self.shown = now
        elif not final:
            sys.stdout.write(("" if len(ids) == 1 else " ") + str(ids[-1]))
        sys.stdout.flush()

    def close(self, ids) -> None:
        if ids:
            self(ids, final=True)
        sys.stdout.write("\n")
        sys.stdout.flush()


def _rows_per_layer(capacities: list[int]) -> str:
    if len(set(capacities)) == 1:
        return f"{capacities[0]} x {len(capacities)}"
    return "/".join(map(str, capacities))


def latency_table(stats: dict) -> str:
    """A short per-token latency breakdown and the byte counts of a flash generation."""
    total = stats["median_total_s"] or float("nan")
    lines = [f"{'per token (median)':<20}{'ms':>10}{'share':>8}"]
    for phase in ("io", "memory", "predictor", "compute"):
        ms = stats[f"median_{phase}_s"] * 1e3
        lines.append(f"{phase:<20}{ms:>10.2f}{ms / 1e3 / total:>8.0%}")
    lines.append(f"{'total':<20}{total * 1e3:>10.2f}")
    tokens = max(stats["tokens"], 1)
    storage = stats["storage_bytes_read"]
    lines += [
        f"flash bytes/token   {stats['flash_bytes_read'] / tokens / 1e6:.3f} MB "
        f"(rows loaded {stats['rows_loaded']}, streamed {stats['rows_streamed']}, evicted "
        f"{stats['rows_evicted']})",
        "storage bytes/token " + ("n/a" if storage is None else f"{storage / tokens / 1e6:.3f} MB"),
        f"DRAM peak {stats['peak_dram_bytes'] / 1e6:.1f} MB of budget "
        f"{stats['dram_budget_bytes'] / 1e6:.1f} MB (buffer rows per layer "
        f"{_rows_per_layer(stats['capacities'])}, "
        f"predictor {stats['predictor']}, window {stats['window']})",
    ]
    return "\n".join(lines)


def cmd_info(args) -> int:
    """Where things are, and what a model needs."""
    import jax.numpy as jnp

    from flashjax.api import _selector, enable_compilation_cache
    from flashjax.budget import dense_bytes, minimum_budget
    from flashjax.engine.options import EngineOptions
    from flashjax.engine.transfer import device_info, device_label
    from flashjax.runtime import default_compute_dtype
    from flashjax.shipped import DEFAULT, SHIPPED, cache_root, converted_dir, shipped_checkpoint
    from flashjax.store.convert import NP_DTYPES
    from flashjax.store.manifest import Manifest

    device = device_info()
    print(f"compute device       {device_label(device)}, jax {device['jax']} (JAX_PLATFORMS)")
    print(f"cache directory      {cache_root()} (FLASHJAX_CACHE)")
    print(f"compilation cache    {enable_compilation_cache() or 'off'} "
          f"(FLASHJAX_COMPILATION_CACHE)")
    converted = None
    for name in SHIPPED:
        label = f"shipped model {name}".ljust(20) if name != DEFAULT else "shipped model".ljust(20)
        try:
            hf_dir = shipped_checkpoint(name)
            converted_here = converted_dir(hf_dir)
            state = "" if converted_here.exists() else " (converted on first use)"
            print(f"{label} {hf_dir}\n  converted            {converted_here}{state}")
            if name == DEFAULT:
                converted = converted_here
        except (FileNotFoundError, ValueError) as e:
            print(f"{label} not available ({e})")
    model_dir = Path(args.model_dir) if args.model_dir else converted
    if model_dir is None or not (model_dir / "manifest.json").exists():
        return 0
    manifest = Manifest.read(model_dir)
    cfg = manifest.config
    heads = f"{cfg.num_attention_heads} heads"
    if cfg.num_key_value_heads != cfg.num_attention_heads:
        heads += f" ({cfg.num_key_value_heads} key/value)"
    print(f"model                {model_dir}\n  family               {cfg.model_type}: "
          f"{cfg.num_hidden_layers} layers, width {cfg.hidden_size}, {heads}, "
          f"{cfg.ffn_dim} FFN neurons ({'/'.join(cfg.ffn_parts)}, {cfg.activation}), "
          f"vocabulary {cfg.vocab_size}, {cfg.sequence_limit}")
    q = manifest.quant
    where = "in the rows" if q is None or q.scales == "row" else \
        f"resident: {manifest.scale_bytes / 1e6:.1f} MB"
    quantized = "" if q is None else f" {q.name} ({q.method}, groups of {q.group}, scales {where})"
    print(f"  store                {manifest.dtype}, format {manifest.format_version}; DRAM part "
          f"{manifest.dram_bytes / 1e6:.1f} MB, FFN on flash {manifest.ffn_bytes / 1e6:.1f} MB "
          f"in{quantized} rows of {manifest.row_bytes} B ({manifest.row_checksum}-checked)")
    if cfg.activation == "silu":
        calibration = model_dir / "calibration.json"
        if cfg.activation_thresholds is None:
            state = "none: every neuron fires (run `flashjax calibrate`)"
        elif calibration.exists():
            record = json.loads(calibration.read_text())
            state = (f"calibrated for {100 * record['sparsity']:.0f}% of neurons skipped "
                     f"({100 * record['measured_mean']:.1f}% on its calibration text)")
        else:
            state = "set in the config"
        print(f"  activation sparsity  {state}")
    predictors = (model_dir / "predictors").exists()
    print(f"  predictors           {'trained' if predictors else 'none (the oracle is used)'}")
    dtype = default_compute_dtype(NP_DTYPES[manifest.dtype])
    options = EngineOptions(max_context=min(cfg.max_sequence, 256))
    if predictors:
        selector = _selector(model_dir, manifest, jnp.dtype(dtype), "lowrank")
        name = selector.name
    else:  # the oracle's weights lie outside the budget: the plan is a selector's without any
        from flashjax.engine.selectors import Hybrid

        selector, name = Hybrid(cfg.ffn_dim), "oracle"
    dense = dense_bytes(manifest, dtype)
    low = minimum_budget(manifest, jnp.dtype(dtype), options, selector)
    print(f"  dense size           {dense:,} bytes in {jnp.dtype(dtype).name} (what budget "
          f"fractions refer to)")
    print(f"  minimum budget       {low:,} bytes = {100 * low / dense:.1f}% (predictor "
          f"{name}, max_context {options.max_context}, max_batch "
          f"{options.max_batch})")
    return 0


def cmd_export(args) -> int:
    from flashjax.store.export import export_model_dir

    t0 = time.perf_counter()
    out = export_model_dir(args.model_dir, args.out_dir, dtype=args.dtype)
    print(f"wrote {out} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


def cmd_verify(args) -> int:
    from flashjax.store.verify import verify

    report = verify(args.model_dir)
    print(report)
    return 0


def cmd_collect(args) -> int:
    import flashjax
    from flashjax.predictor.collect import collect

    model = flashjax.load(args.model_dir, progress=False)
    meta = collect(model, args.text, args.out, tokens=args.tokens, seq_len=args.seq_len,
                   batch=args.batch)
    print(f"{args.out}: {meta['tokens_written']} tokens x {meta['n_layers']} layers",
          file=sys.stderr)
    return 0


def cmd_calibrate(args) -> int:
    from flashjax.predictor.calibrate import calibrate

    record = calibrate(args.model_dir, args.text, sparsity=args.sparsity, tokens=args.tokens,
                       seq_len=args.seq_len, batch=args.batch, passes=args.passes,
                       force=args.force)
    per_layer = ", ".join(f"{100 * m:.1f}" for m in record["measured_sparsity"])
    print(f"{args.model_dir}: skips {100 * record['measured_mean']:.1f}% of FFN neurons per "
          f"token on {record['tokens']} tokens of {args.text} (per layer: {per_layer}%); "
          f"thresholds {', '.join(f'{t:.4g}' for t in record['thresholds'])}", file=sys.stderr)
    return 0


def cmd_train_predictors(args) -> int:
    from flashjax.predictor.train import train_predictors

    ranks = args.rank
    summary = train_predictors(args.model_dir, args.data, rank=ranks, steps=args.steps,
                               batch=args.batch, lr=args.lr, seed=args.seed,
                               target_recall=args.target_recall, overwrite=args.overwrite)
    print(f"{'layer':>5} {'recall':>7} {'precision':>9} {'predicted':>9} {'true':>7}")
    for m in summary["layers"]:
        print(f"{m['layer']:>5} {m['recall']:>7.4f} {m['precision']:>9.4f} "
              f"{m['predicted_active_fraction']:>9.4f} {m['true_active_fraction']:>7.4f}")
    print(f"trained in {summary['train_seconds_this_run']:.0f} s", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from flashjax.predictor.evaluate import evaluate

    result = evaluate(args.model_dir, args.text, dram_budget=args.dram_budget,
                      window=args.window, tokens=args.tokens, seq_len=args.seq_len,
                      progress=not args.json, verify_reads=not args.no_verify_reads)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"perplexity: dense {result['ppl_dense']:.3f}, flash with predictors "
          f"{result['ppl_sparse']:.3f} ({(result['ppl_ratio'] - 1) * 100:+.2f}%) over "
          f"{result['tokens']} tokens")
    print(f"{'layer':>5} {'recall':>7} {'precision':>9} {'predicted':>9} {'true':>7}")
    for i, m in enumerate(result["layers"]):
        print(f"{i:>5} {m['recall']:>7.4f} {m['precision']:>9.4f} "
              f"{m['predicted_active_fraction']:>9.4f} {m['true_active_fraction']:>7.4f}")
    print(f"flash bytes/token {result['flash_bytes_per_token'] / 1e3:.1f} kB, storage "
          f"bytes/token {result['storage_bytes_per_token'] / 1e3:.1f} kB, window "
          f"{result['window']}, {result['capacity']} neurons/layer")
    return 0


def cmd_bench(args) -> int:
    from flashjax.bench.run import (bench, format_table, markdown_limited, markdown_table,
                                    plot, save_json)

    if args.peers is not None and not (Path(args.peers) / "config.json").is_file():
        raise UsageError(f"--peers {args.peers}: not a Hugging Face checkpoint directory (no "
                         f"config.json)")
    if args.peers is not None:
        missing = [m for m in ("torch", "transformers", "accelerate")
                   if importlib.util.find_spec(m) is None]
        if missing:
            raise UsageError(f"--peers needs {', '.join(missing)}: pip install "
                             f"'flashjax[peers]'")
    if args.device is not None:
        from flashjax.engine.transfer import use_device

        try:
            use_device(args.device)
        except ValueError as e:
            raise UsageError(str(e)) from None
    result = bench(args.model_dir, dram_budget=args.dram_budget, tokens=args.tokens,
                   window=args.window, device=not args.no_device_limit,
                   windows=args.windows, trace=args.trace, prompt_tokens=args.prompt_tokens,
                   device_seconds=args.device_seconds, peers=args.peers,
                   memory_limit=args.memory_limit, runtime_allowance=args.runtime_allowance,
                   keep_unbundled=args.keep_unbundled, only=args.only)
    print(format_table(result))
    if args.json:
        save_json(result, args.json)
    if args.plots:
        table = Path(args.plots) / "table.md"
        paths = plot(result, args.plots)
        text = markdown_table(result)
        if any("process" in r for r in result["configs"].values()):
            text += "\n" + markdown_limited(result)
        table.write_text(text)
        for path in [*paths, table]:
            print(f"wrote {path}", file=sys.stderr)
    return 0


DESCRIPTION = ("Run language models whose FFN weights stay on flash: convert a Hugging Face "
               "checkpoint once, train its activation predictors, generate within a DRAM "
               "budget, and measure it.")


def _shown_default(action) -> bool:
    return not any(action.default is v for v in (None, False, argparse.SUPPRESS))


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default (where it has one worth showing)."""

    def _get_help_string(self, action):
        if not _shown_default(action) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _add_sampling_options(p) -> None:
    p.add_argument("--temperature", type=_number(float, 0),
                   help="0: greedy (the default, but for the shipped model: 0.8 with top-p 0.9)")
    p.add_argument("--top-k", type=_number(int, 0), default=0)
    p.add_argument("--top-p", type=_number(float, 0, 1, low_open=True))
    p.add_argument("--seed", type=int, default=0)


def _add_text_options(p, tokens: int) -> None:
    """The dense model run over text in fixed-length sequences (collect, calibrate)."""
    p.add_argument("--text", required=True, help=".txt or .jsonl (field 'text') or a directory")
    p.add_argument("--tokens", type=_POSITIVE, default=tokens)
    p.add_argument("--seq-len", type=_number(int, 2), default=256)
    p.add_argument("--batch", type=_POSITIVE, default=8, help="sequences per forward pass")


def _add_quant_options(p) -> None:
    p.add_argument("--group", type=_number(int, 2),
                   help="values per scale (default: 128 for int8, 64 for int4, at most the "
                        "model width)")
    p.add_argument("--scales", choices=SCALE_PLACES,
                   help="where the scales go: in each row (one read brings all a neuron needs) "
                        "or resident in DRAM; default: dram when the values alone fill whole "
                        "4 KiB blocks, else row")


def _add_shipped_option(p) -> None:
    from flashjax.shipped import SHIPPED

    p.add_argument("--model", choices=tuple(SHIPPED), default=None,
                   help="which shipped model runs when no MODEL_DIR is given (default: opt)")


def _add_load_options(p, max_context_help: str) -> None:
    """How the model is loaded: dense, or flash-backed within a DRAM budget."""
    p.add_argument("--dram-budget", type=_budget,
                   help="keep the FFN on flash within this DRAM budget: bytes (>= 1024), '6GB', "
                   "'512MiB', a fraction (0.5) or '50%%' of the dense size")
    p.add_argument("--predictor", choices=("oracle", "lowrank", "hybrid", "naive", "none"),
                   help="which neurons each token reads (implies flash mode; default: lowrank "
                   "when the model has predictors, else oracle)")
    p.add_argument("--window", type=_POSITIVE, default=4,
                   help="keep neurons of the last k tokens")
    p.add_argument("--max-context", type=_POSITIVE, help=max_context_help)
    p.add_argument("--page-cache", action="store_true",
                   help="let the OS page cache serve flash reads (default: O_DIRECT)")
    p.add_argument("--no-verify-reads", action="store_true",
                   help="skip the crc32 check of every row read from flash")


def build_parser() -> argparse.ArgumentParser:
    import flashjax

    parser = argparse.ArgumentParser(prog="flashjax", description=DESCRIPTION)
    parser.add_argument("--version", action="version",
                        version=f"flashjax {flashjax.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser = sub.add_parser
    sub.add_parser = lambda *a, **kw: add_parser(*a, formatter_class=_Help, **kw)

    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint (OPT; Llama, "
                                       "Mistral or Qwen2 with ReLU)")
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"),
                   help="storage dtype (default: the checkpoint's)")
    p.add_argument("--activation", choices=("relu", "drelu"),
                   help="a gated model's FFN activation: drelu is relu(gate) * relu(up) "
                        "(TurboSparse); default: the config's (relu)")
    p.add_argument("--ffn-dtype", choices=FFN_DTYPES,
                   help="store the FFN rows quantized (round to nearest, group-wise float16 "
                        "scales); the DRAM part keeps --dtype. Default: --dtype")
    _add_quant_options(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("quantize", help="a converted model with its FFN rows in int8 or int4, "
                                        "as a new model directory")
    p.add_argument("model_dir")
    p.add_argument("out_dir")
    p.add_argument("--ffn-dtype", choices=FFN_DTYPES, required=True)
    p.add_argument("--method", choices=METHODS, default="rtn",
                   help="rtn: round to nearest; mse: per group the clipping that minimises the "
                        "rows' output error on the activations of --data")
    p.add_argument("--data", help="activations recorded by `flashjax collect` (for --method "
                                  "mse)")
    p.add_argument("--tokens", type=_number(int, 1),
                   help="use the first this many tokens of --data (default: all)")
    _add_quant_options(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("place", help="reorder each layer's neurons on flash so that neurons "
                                     "that fire together are adjacent (fewer, longer reads; "
                                     "the same outputs)")
    p.add_argument("model_dir")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="activations recorded by `flashjax collect` from this model")
    src.add_argument("--trace", help="an activity trace of this model's shape "
                                     "(scripts/make_activity_trace.py)")
    p.add_argument("--out", help="write the placed model here (default: in place)")
    p.add_argument("--methods", help="comma-separated candidates (default: frequency,greedy,"
                                     "greedy-cosine,spectral; the best per layer is kept)")
    p.add_argument("--tokens", type=_number(int, 8), help="use the first this many tokens")
    p.add_argument("--window", type=_number(int, 1), default=4,
                   help="score orders on the rows new to the last this many tokens")
    p.add_argument("--gap", type=_number(int, 0),
                   help="score with reads spanning up to this many bytes of unneeded rows "
                        "(default: the reader's)")
    p.add_argument("--scores", help="write every layer's held-out scores here (JSON)")
    p.set_defaults(func=cmd_place)

    p = sub.add_parser("generate", help="generate text with a converted model")
    p.add_argument("model_dir", nargs="?",
                   help="a converted model (default: the shipped model, flash-backed at 50%%)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", type=_utf8,
                     help="prompt text (needs a tokenizer in the model dir)")
    src.add_argument("--prompt-ids", type=_parse_ids, help="comma-separated token ids")
    p.add_argument("--max-new-tokens", type=_POSITIVE, default=32)
    _add_sampling_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    _add_load_options(p, "KV-cache slots reserved in the budget (default: the prompt plus "
                         "--max-new-tokens)")
    _add_shipped_option(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="an interactive conversation; the KV cache (and the "
                                    "flash model's neuron buffers) kept between turns")
    p.add_argument("model_dir", nargs="?",
                   help="a converted model with a tokenizer (default: the shipped model, "
                        "flash-backed at 50%%)")
    p.add_argument("--max-new-tokens", type=_POSITIVE, default=256, help="per reply")
    _add_sampling_options(p)
    p.add_argument("--system", type=_utf8, help="a system message to start with")
    _add_load_options(p, "the most tokens the conversation holds (default: the model's "
                         "limit); a flash model's KV cache is reserved for them")
    _add_shipped_option(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, "
                                     "/v1/chat/completions); needs the serve extra")
    p.add_argument("model_dir", nargs="?",
                   help="a converted model with a tokenizer (default: the shipped model, "
                        "flash-backed at 50%%)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_number(int, 0, 65535), default=8000)
    p.add_argument("--model-name", help="the name /v1/models gives (default: the model "
                                        "directory's); requests may name any model")
    p.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"),
                   default="info", help="uvicorn's log level")
    _add_load_options(p, "the most tokens a request's prompt and max_tokens may take "
                         "(default: the model's limit); a flash model's KV cache is reserved "
                         "for them")
    _add_shipped_option(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("collect", help="record FFN inputs and neuron activity on text")
    p.add_argument("model_dir")
    p.add_argument("--out", required=True, help="data directory (a rerun resumes)")
    _add_text_options(p, tokens=100_000)
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("calibrate", help="SwiGLU models: per-layer activation thresholds "
                       "that skip a chosen fraction of FFN neurons (an approximation)")
    p.add_argument("model_dir")
    p.add_argument("--sparsity", type=_number(float, 0, 1), required=True,
                   help="fraction of each layer's neurons skipped per token (0: exact)")
    _add_text_options(p, tokens=16384)
    p.add_argument("--passes", type=_POSITIVE, default=2,
                   help="sweeps that refine the thresholds (each layer's input depends on the "
                        "layers before it)")
    p.add_argument("--force", action="store_true",
                   help="remove the store's trained predictors (they predict the old activity)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("train-predictors", help="train the low-rank activation predictors")
    p.add_argument("model_dir")
    p.add_argument("--data", required=True, help="a `flashjax collect` directory")
    p.add_argument("--rank", type=_POSITIVE, help="predictor rank (default max(64, d_model/32))")
    p.add_argument("--steps", type=_POSITIVE, default=2000, help="steps per layer")
    p.add_argument("--batch", type=_POSITIVE, default=1024, help="tokens per step")
    p.add_argument("--lr", type=_number(float, 0, low_open=True), default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-recall", type=_number(float, 0, 1, low_open=True), default=0.99,
                   help="each layer's threshold keeps this fraction of active neurons, in (0, 1]")
    p.add_argument("--overwrite", action="store_true", help="replace existing predictors")
    p.set_defaults(func=cmd_train_predictors)

    p = sub.add_parser("eval", help="perplexity dense vs flash with predictors; recall")
    p.add_argument("model_dir")
    p.add_argument("--text", required=True)
    p.add_argument("--dram-budget", type=_budget, default="50%")
    p.add_argument("--window", type=_POSITIVE, default=4)
    p.add_argument("--tokens", type=_POSITIVE, default=2048)
    p.add_argument("--seq-len", type=_number(int, 2), default=256)
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-verify-reads", action="store_true",
                   help="skip the crc32 check of every row read from flash")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="the paper's configurations under one DRAM budget")
    p.add_argument("model_dir")
    p.add_argument("--dram-budget", type=_budget, default="50%")
    p.add_argument("--tokens", type=_POSITIVE, default=16,
                   help="generated tokens per configuration")
    p.add_argument("--window", type=_POSITIVE, default=4)
    p.add_argument("--json", help="write every figure to this JSON file")
    p.add_argument("--plots", help="write PNG plots into this directory")
    p.add_argument("--no-device-limit", action="store_true",
                   help="skip the storage random-read sweep (it writes a 1 GiB scratch file)")
    p.add_argument("--device-seconds", type=_number(float, 0, low_open=True), default=0.5,
                   help="seconds per point of the device sweep")
    p.add_argument("--windows", type=_windows, default=[1, 2, 4, 8],
                   help="window sizes of the rows-vs-window sweep (comma-separated)")
    p.add_argument("--trace", help="drive the predictor configurations with this activity "
                   "trace (synthetic stores; see scripts/make_activity_trace.py)")
    p.add_argument("--prompt-tokens", type=_POSITIVE, default=None,
                   help="prompt length in tokens (default: a fixed text, or 10 ids)")
    p.add_argument("--peers", metavar="HF_DIR",
                   help="also run transformers + accelerate disk offload and memory-mapped "
                   "weights on this Hugging Face checkpoint (the one MODEL_DIR was converted "
                   "from), and check every configuration's tokens against the dense model's "
                   "(needs the peers extra)")
    p.add_argument("--memory-limit", type=_memory_limit, default=None, metavar="BYTES|auto",
                   help="run every configuration in its own process inside a memory cgroup of "
                   "this size (RSS and page cache together; auto: the DRAM budget plus "
                   "--runtime-allowance), the files' pages evicted before each run")
    p.add_argument("--runtime-allowance", type=_size, default=1 << 30, metavar="BYTES",
                   help="what --memory-limit auto adds to the budget for the runtime "
                   "(Python, XLA, libraries)")
    p.add_argument("--keep-unbundled", action="store_true",
                   help="write the unbundled FFN copy into MODEL_DIR and keep it for later "
                   "runs (default: a temporary copy beside it, removed at the end)")
    p.add_argument("--only", type=lambda t: [n.strip() for n in t.split(",") if n.strip()],
                   help="run only these configurations (comma-separated names, peers "
                   "included; naive always runs)")
    p.add_argument("--device", choices=("cpu", "gpu"), default=None,
                   help="the compute device (default: JAX's choice, GPU where one is "
                   "installed); the table names the one it ran on")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("export", help="write a converted model back as a Hugging Face "
                                      "checkpoint (sharded safetensors)")
    p.add_argument("model_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=("float16", "float32"),
                   help="storage dtype (default: the model's; bfloat16 is written as float32)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("info", help="where the caches and the shipped model are; a model's "
                                    "shape, sizes and minimum DRAM budget")
    p.add_argument("model_dir", nargs="?", help="a converted model (default: the shipped one)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("verify", help="check a converted model directory's files and checksums")
    p.add_argument("model_dir")
    p.set_defaults(func=cmd_verify)
    for command in sub.choices.values():  # options without help still show their default
        for action in command._actions:
            if action.help is None and action.option_strings and _shown_default(action):
                action.help = "(default: %(default)s)"
    return parser


# What an interrupt leaves behind, per command.
_INTERRUPTED = {
    "convert": "nothing was written",
    "export": "nothing was written",
    "collect": "the collection can resume: rerun the same command",
    "train-predictors": "the layers trained so far are kept: rerun the same command to resume",
}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from flashjax import CheckpointError, ConfigError, StoreError

    if getattr(args, "model", None) is not None and args.model_dir is not None:
        print(f"error: --model {args.model} names a shipped model; give it or MODEL_DIR "
              f"({args.model_dir}), not both", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (CheckpointError, ConfigError, StoreError, FileExistsError, FileNotFoundError,
            ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `flashjax info | head`: the reader has all it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # (so the exit's flush of stdout fails no more)
        return 0
    except KeyboardInterrupt:
        left = _INTERRUPTED.get(args.command)
        print(f"\ninterrupted{'; ' + left if left else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
