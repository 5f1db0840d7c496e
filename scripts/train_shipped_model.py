"""Train a small model that flashjax ships, from scratch, on the documentation corpus.

    python scripts/train_shipped_model.py --steps 1100 --max-minutes 95
    python scripts/train_shipped_model.py --family llama --ffn 1376 --seq-len 128 \
        --work-dir data/train_llama --out data/llama-swiglu --max-minutes 40

``--family opt`` (the default) is the ReLU OPT of ``checkpoints/flashjax-docs-9m``; ``--family
llama`` a SwiGLU Llama (RMSNorm, rotary positions, SiLU-gated FFN: every neuron fires a
little), the starting point of ``scripts/relufy.py``.

Data: random contiguous windows of ``--seq-len + 1`` tokens of ``data/corpus/train.u16.npy``
(documents are separated by id 2, OPT's bos/eos, so a window that crosses a boundary sees the
bos the model gets at inference). The batch of step t depends only on (seed, t), so a resumed
run sees exactly the batches an uninterrupted one would. Loss: teacher-forced next-token
cross-entropy over every position. AdamW, linear warmup then cosine decay, global-norm clipping.

Every ``--ckpt-every`` steps the parameters, optimizer state and log go to an orbax checkpoint
in ``--work-dir``; starting again with the same work dir resumes from the latest one. At the end
(all steps, or ``--max-minutes`` of training reached) the model is exported as a float16
Hugging Face OPT checkpoint to ``--out`` with the tokenizer and ``train_log.json``.

``--benchmark-seconds S`` only times train steps for S seconds after compilation and exits.

Shape legend: B batch, S seq_len, V vocabulary.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from flashjax.config import LlamaConfig, ModelConfig, OPTConfig
from flashjax.model.decoder import init_params
from flashjax.model import decoder
from flashjax.store.export import export_hf

INIT_STD = 0.02  # GPT-2/OPT initialisation


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch: int
    seq_len: int
    peak_lr: float
    warmup_steps: int
    final_lr_frac: float  # cosine decays to peak_lr * final_lr_frac
    weight_decay: float
    clip_norm: float
    seed: int


def model_config(args) -> ModelConfig:
    if args.family == "llama":
        return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                           num_hidden_layers=args.layers, ffn_dim=args.ffn,
                           num_attention_heads=args.heads,
                           num_kv_heads=args.kv_heads or args.heads,
                           head_size=args.hidden // args.heads,
                           max_position_embeddings=args.max_pos, rms_norm_eps=1e-5,
                           tie_word_embeddings=True, activation="silu",
                           pad_token_id=1, bos_token_id=2, eos_token_id=2)
    return OPTConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                     num_hidden_layers=args.layers, ffn_dim=args.ffn,
                     num_attention_heads=args.heads, max_position_embeddings=args.max_pos,
                     word_embed_proj_dim=args.hidden, do_layer_norm_before=True)


def initial_params(cfg: ModelConfig, seed: int):
    """The tree of ``init_params`` with GPT-2/OPT's initialisation (Llama's too): N(0, 0.02)
    weights, the two projections into the residual stream scaled by 1/sqrt(2L), zero biases,
    unit norms."""
    params = init_params(cfg, seed)
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(jax.tree.leaves(params))))
    resid_std = INIT_STD / math.sqrt(2 * cfg.num_hidden_layers)

    def init(path, x):
        names = [p.key for p in path]
        key = next(keys)
        if names[-1] == "bias":
            return jnp.zeros_like(x)
        if names[-1] == "scale":
            return jnp.ones_like(x)
        into_residual = {"out_proj", "fc2", "o_proj", "down"} & set(names)
        std = resid_std if into_residual else INIT_STD
        return std * jax.random.normal(key, x.shape, x.dtype)

    return jax.tree_util.tree_map_with_path(init, params)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tc.peak_lr, warmup_steps=tc.warmup_steps,
        decay_steps=max(tc.steps, tc.warmup_steps + 1), end_value=tc.peak_lr * tc.final_lr_frac)
    # Decay matrices only: biases, norms are 1-D.
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
    return optax.chain(optax.clip_by_global_norm(tc.clip_norm),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=tc.weight_decay,
                                   mask=decay_mask))


def lr_at(tc: TrainConfig, step: int) -> float:
    if step < tc.warmup_steps:
        return tc.peak_lr * step / tc.warmup_steps
    t = min(1.0, (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps))
    return tc.peak_lr * (tc.final_lr_frac + (1 - tc.final_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def teacher_forced(module, tokens, positions, *, l1: bool = False):
    """The family's module over full sequences: logits [B, S, V] and, with ``l1``, the mean
    over layers of the FFN activations' mean absolute value (the sparsity penalty of
    ``scripts/relufy.py``; 0 without).

    Runs the module's own embed, layers and head, but gives each layer a fresh [B, S, G, K]
    key/value buffer instead of the stacked [L, B, S, G, K] KVCache that the module's
    ``__call__`` updates layer by layer: same arithmetic, and the gradient no longer flows
    through L full-cache copies (measured on this 2-core CPU for the 7M OPT, B=32, S=256: 4.8 s
    per value-and-grad against 7.7 s through ``OPT.__call__``; identical loss).
    """
    cfg = module.cfg
    b, s = tokens.shape
    h = module.embed(tokens, positions)
    valid = jnp.ones((b, s), bool)
    # [B, S, G, K]
    empty = jnp.zeros((b, s, cfg.num_key_value_heads, cfg.head_dim), h.dtype)
    penalty = jnp.zeros((), jnp.float32)
    for layer in module.layers:
        h, ffn_in, _, _ = layer.attend(h, empty, empty, valid, 0, positions)
        if l1:
            out, hidden = layer.ffn.hidden(ffn_in)
            penalty = penalty + jnp.abs(hidden).mean() / len(module.layers)
        else:
            out = layer.ffn(ffn_in)
        h = layer.finish(h, out)
    return module.head(h), penalty


def nll(cfg: ModelConfig, params, windows):
    """Mean next-token NLL in nats. windows: [B, S+1] int32; the model reads [:, :-1]."""
    return nll_and_l1(cfg, params, windows, l1=False)[0]


def nll_and_l1(cfg: ModelConfig, params, windows, *, l1: bool):
    """(mean next-token NLL in nats, the FFN activations' L1 penalty) of windows [B, S+1]."""
    tokens, targets = windows[:, :-1], windows[:, 1:]
    b, s = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    # [B, S, V]
    logits, penalty = decoder.module(cfg).apply(
        {"params": params}, tokens, positions, method=functools.partial(teacher_forced, l1=l1))
    # [B, S]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return losses.mean(), penalty


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 3))
def train_step(cfg: ModelConfig, opt: optax.GradientTransformation, params, opt_state, windows):
    """One AdamW step on windows [B, S+1]. params and opt_state are donated.
    Returns (params, opt_state, loss, grad_norm)."""
    loss, grads = jax.value_and_grad(functools.partial(nll, cfg))(params, windows)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, optax.global_norm(grads)


@functools.partial(jax.jit, static_argnums=0)
def eval_nll_sum(cfg: ModelConfig, params, windows):
    return nll(cfg, params, windows) * (windows.shape[0] * (windows.shape[1] - 1))


def batch_at(train: np.ndarray, tc: TrainConfig, step: int) -> np.ndarray:
    """The batch of step ``step``: [B, S+1] int32 random contiguous windows, a function of
    (seed, step) only."""
    rng = np.random.default_rng([tc.seed, step])
    starts = rng.integers(0, len(train) - tc.seq_len - 1, size=tc.batch)
    idx = starts[:, None] + np.arange(tc.seq_len + 1)[None, :]
    return train[idx].astype(np.int32)


def heldout_windows(heldout: np.ndarray, seq_len: int, limit: int | None) -> np.ndarray:
    """Non-overlapping [W, S+1] windows from the start of the heldout stream (the same every
    time); window i covers tokens [i*S, (i+1)*S] so every heldout token but the first is a
    target exactly once."""
    n = (len(heldout) - 1) // seq_len
    if limit is not None:
        n = min(n, limit)
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return heldout[idx].astype(np.int32)


def evaluate(cfg, params, windows: np.ndarray, batch: int) -> float:
    """Perplexity exp(mean NLL) over all windows (a ragged last batch costs one more compile)."""
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = jnp.asarray(windows[i:i + batch])
        total += float(eval_nll_sum(cfg, params, w))
        count += w.shape[0] * (w.shape[1] - 1)
    return math.exp(total / count)


class RunCheckpoints:
    """A resumable run's orbax checkpoints (parameters and optimizer state, the last two kept)
    and JSON log in ``work``, for settings ``spec``: a work dir holding another spec's
    checkpoints is refused."""

    def __init__(self, work: Path, spec: dict):
        self.work = Path(work).absolute()
        self.work.mkdir(parents=True, exist_ok=True)
        self.spec = json.loads(json.dumps(spec))
        self.manager = ocp.CheckpointManager(
            self.work / "ckpt", options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))

    @property
    def latest(self) -> int | None:
        return self.manager.latest_step()

    def resume(self, params, opt_state, log: dict):
        """(params, opt_state, log, step) of the latest checkpoint, or the arguments and step
        0 where there is none."""
        if self.latest is None:
            return params, opt_state, log, 0
        saved = json.loads((self.work / "run.json").read_text())
        if saved["spec"] != self.spec:
            raise ValueError(f"{self.work}: its checkpoints were made with other settings; "
                             f"use a new --work-dir. saved={saved['spec']} now={self.spec}")
        step = self.latest
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(
            {"params": params, "opt_state": opt_state}))
        log = json.loads((self.work / f"log_{step}.json").read_text())
        return restored["params"], restored["opt_state"], log, step

    def save(self, step: int, params, opt_state, log: dict) -> None:
        (self.work / f"log_{step}.json").write_text(json.dumps(log))
        (self.work / "run.json").write_text(json.dumps({"spec": self.spec}))
        self.manager.save(step, args=ocp.args.StandardSave({"params": params,
                                                             "opt_state": opt_state}))
        self.manager.wait_until_finished()
        for old in self.work.glob("log_*.json"):
            if int(old.stem.split("_")[1]) not in self.manager.all_steps():
                old.unlink()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", default="data/corpus/train.u16.npy")
    p.add_argument("--heldout", default="data/corpus/heldout.u16.npy")
    p.add_argument("--tokenizer", default="data/tokenizer/tokenizer.json")
    p.add_argument("--work-dir", default="data/train_run")
    p.add_argument("--out", default="checkpoints/flashjax-docs-9m")
    p.add_argument("--family", choices=("opt", "llama"), default="opt")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None, help="llama: key/value heads "
                   "(default: --heads)")
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--max-pos", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=1100)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--final-lr-frac", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-windows", type=int, default=64,
                   help="heldout windows for periodic evals; the final eval uses all of them")
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop training (then export) after this much training wall time, "
                        "summed over resumed runs")
    p.add_argument("--benchmark-seconds", type=float, default=None)
    return p.parse_args(argv)


def benchmark(cfg, tc, opt, train, seconds: float) -> None:
    params = initial_params(cfg, tc.seed)
    opt_state = opt.init(params)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    t0 = time.perf_counter()
    params, opt_state, loss, _ = train_step(cfg, opt, params, opt_state, batch_at(train, tc, 0))
    loss.block_until_ready()
    compile_s = time.perf_counter() - t0
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        params, opt_state, loss, _ = train_step(cfg, opt, params, opt_state,
                                                batch_at(train, tc, steps + 1))
        loss.block_until_ready()
        steps += 1
    dt = time.perf_counter() - t0
    print(json.dumps({"params": n_params, "layers": cfg.num_hidden_layers,
                      "hidden": cfg.hidden_size, "ffn": cfg.ffn_dim, "batch": tc.batch,
                      "seq_len": tc.seq_len, "compile_s": round(compile_s, 1), "steps": steps,
                      "steps_per_s": round(steps / dt, 3),
                      "tokens_per_s": round(steps * tc.batch * tc.seq_len / dt),
                      "loss": float(loss)}))


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = model_config(args)
    tc = TrainConfig(steps=args.steps, batch=args.batch, seq_len=args.seq_len, peak_lr=args.lr,
                     warmup_steps=args.warmup, final_lr_frac=args.final_lr_frac,
                     weight_decay=args.weight_decay, clip_norm=args.clip, seed=args.seed)
    if tc.seq_len > cfg.max_position_embeddings:
        raise ValueError(f"--seq-len {tc.seq_len} exceeds --max-pos {cfg.max_position_embeddings}")
    train = np.load(args.train, mmap_mode="r")
    heldout = np.load(args.heldout)
    if int(train.max()) >= cfg.vocab_size:
        raise ValueError(f"{args.train}: token id {int(train.max())} >= --vocab {cfg.vocab_size}")
    opt = make_optimizer(tc)
    if args.benchmark_seconds:
        return benchmark(cfg, tc, opt, train, args.benchmark_seconds)

    run_spec = {"model": dataclasses.asdict(cfg), "train": dataclasses.asdict(tc)}
    checkpoints = RunCheckpoints(Path(args.work_dir), run_spec)
    log = {"commands": [], "wall_s": 0.0, "loss_curve": [], "evals": []}
    params = initial_params(cfg, tc.seed)
    resuming = checkpoints.latest is not None
    params, opt_state, log, start = checkpoints.resume(params, opt.init(params), log)
    if resuming:
        print(f"resumed from step {start} ({log['wall_s']:.0f} s of training so far)", flush=True)
    log["commands"].append(shlex.join([sys.executable, *sys.argv]))

    def save(step: int) -> None:
        checkpoints.save(step, params, opt_state, log)

    eval_small = heldout_windows(heldout, tc.seq_len, args.eval_windows)
    budget_s = None if args.max_minutes is None else 60 * args.max_minutes
    step, t_last = start, time.perf_counter()
    bar = tqdm(total=tc.steps, initial=start, desc="train", unit="step", mininterval=30)
    while step < tc.steps and (budget_s is None or log["wall_s"] < budget_s):
        params, opt_state, loss, gnorm = train_step(cfg, opt, params, opt_state,
                                                    batch_at(train, tc, step))
        step += 1
        if step % args.log_every == 0 or step == tc.steps:
            loss = float(loss)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step}")
            log["loss_curve"].append({"step": step, "loss": round(loss, 4),
                                      "grad_norm": round(float(gnorm), 3),
                                      "lr": lr_at(tc, step - 1)})
            bar.set_postfix(loss=f"{loss:.3f}")
        now = time.perf_counter()
        log["wall_s"] += now - t_last
        t_last = now
        bar.update(1)
        if step % args.eval_every == 0:
            ppl = evaluate(cfg, params, eval_small, tc.batch)
            log["evals"].append({"step": step, "heldout_ppl_subset": round(ppl, 3)})
            print(f"\nstep {step}: heldout ppl ({len(eval_small)} windows) {ppl:.2f}, "
                  f"train wall {log['wall_s'] / 60:.1f} min", flush=True)
            t_last = time.perf_counter()  # evals do not count against the training budget
        if step % args.ckpt_every == 0:
            save(step)
            t_last = time.perf_counter()
    bar.close()
    if step != checkpoints.latest:
        save(step)

    eval_all = heldout_windows(heldout, tc.seq_len, None)
    ppl = evaluate(cfg, params, eval_all, tc.batch)
    print(f"final heldout perplexity over {len(eval_all)} windows: {ppl:.3f}", flush=True)
    out = Path(args.out)
    export_hf(params, cfg, out, dtype="float16", overwrite=True)
    shutil.copy2(args.tokenizer, out / "tokenizer.json")
    n_params = sum(int(x.size) for x in jax.tree.leaves(params))
    train_log = {
        "commands": log["commands"],
        "seed": tc.seed,
        "model_config": cfg.to_hf_config(),
        "train_config": dataclasses.asdict(tc),
        "parameters": n_params,
        "steps_done": step,
        "stopped_by": "steps" if step >= tc.steps else "max_minutes",
        "tokens_seen": step * tc.batch * tc.seq_len,
        "train_wall_s": round(log["wall_s"], 1),
        "final_heldout": {"perplexity": round(ppl, 3), "windows": len(eval_all),
                          "tokens": len(eval_all) * tc.seq_len,
                          "note": "float32 weights before float16 export; non-overlapping "
                                  f"{tc.seq_len}-token windows from the start of the heldout split"},
        "evals": log["evals"],
        "loss_curve": log["loss_curve"][:: max(1, len(log["loss_curve"]) // 200)],
        "data": {"train": args.train, "heldout": args.heldout, "tokenizer": args.tokenizer,
                 "train_tokens": int(len(train)), "heldout_tokens": int(len(heldout))},
        "software": {"jax": jax.__version__, "optax": optax.__version__},
    }
    (out / "train_log.json").write_text(json.dumps(train_log, indent=2) + "\n")
    print(f"exported to {out}", flush=True)


if __name__ == "__main__":
    main()
