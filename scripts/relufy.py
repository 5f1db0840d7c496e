"""Relufy a SwiGLU Llama-family checkpoint: SiLU becomes ReLU, then the model is fine-tuned
with an L1 penalty on its FFN activations that ramps up over training (the ProSparse / "ReLU
strikes back" recipe), and written as a Hugging Face ReLU checkpoint (``hidden_act: relu``)
that ``flashjax convert`` takes like any other.

    python scripts/relufy.py data/llama-swiglu --text data/corpus/train.txt \\
        --heldout data/corpus/heldout.txt --out data/llama-relu --steps 400

Training follows ``scripts/train_shipped_model.py``: random contiguous windows of the
tokenised text (the batch of step t depends only on (seed, t)), teacher-forced next-token
cross-entropy, AdamW with warmup then cosine decay, global-norm clipping, jit-compiled steps.
The loss adds ``l1(t) * mean_l mean|relu(W_gate x) * (W_up x)|``, the mean absolute FFN
activation over layers, where ``l1(t)`` rises linearly from 0 to ``--l1`` over the first
``--ramp`` of the steps and then stays there: the model first recovers from the swap, then is
pushed towards fewer active neurons.

Every ``--ckpt-every`` steps the parameters, optimizer state and log go to an orbax checkpoint
in ``--work-dir``; running again with the same work dir resumes. At the end the float16
checkpoint, the tokenizer, ``relufy_log.json`` and ``relufy_curves.png`` (loss, penalty,
activation sparsity and held-out perplexity against step) are written to ``--out``, through a
temporary directory renamed when complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_shipped_model as tsm  # noqa: E402 (the training loop's conventions)

import flashjax  # noqa: E402
from flashjax.config import LlamaConfig  # noqa: E402
from flashjax.model import decoder  # noqa: E402
from flashjax.predictor.text import token_stream  # noqa: E402
from flashjax.store.convert import TOKENIZER_FILES, convert  # noqa: E402
from flashjax.store.export import export_hf  # noqa: E402


def relu_config(cfg: LlamaConfig) -> LlamaConfig:
    if not isinstance(cfg, LlamaConfig):
        raise ValueError(f"relufy: a Llama-family checkpoint is needed, found {cfg.model_type}")
    return dataclasses.replace(cfg, activation="relu", activation_thresholds=None)


def load_params(hf_dir: Path):
    """(config, float32 parameters) of a Hugging Face checkpoint, through a temporary store."""
    with tempfile.TemporaryDirectory(prefix="relufy-") as tmp:
        convert(hf_dir, Path(tmp) / "store", dtype="float32", progress=False)
        model = flashjax.load(Path(tmp) / "store", progress=False)
        params = jax.tree.map(lambda x: jnp.array(x, jnp.float32), model.params)
        return model.cfg, params, model.tokenizer


def tokenise(tokenizer, text: Path, eos_id: int) -> np.ndarray:
    """The text's documents as one int32 stream, ``eos_id`` after each (as ``collect``)."""
    return np.fromiter(token_stream(text, tokenizer, eos_id), np.int32)


@dataclasses.dataclass(frozen=True)
class Recipe:
    l1: float
    ramp: float  # fraction of the steps over which the penalty rises to l1

    def coefficient(self, step, steps: int):
        return self.l1 * jnp.minimum(1.0, step / max(1.0, self.ramp * steps))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(4, 5))
def train_step(cfg, opt, recipe: Recipe, steps: int, params, opt_state, windows, step):
    """One AdamW step on windows [B, S+1] with the ramped L1 penalty; params and opt_state
    are donated. Returns (params, opt_state, nll, penalty, grad_norm)."""
    def loss(p):
        nll, penalty = tsm.nll_and_l1(cfg, p, windows, l1=True)
        return nll + recipe.coefficient(step, steps) * penalty, (nll, penalty)

    (_, (nll, penalty)), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, nll, penalty, optax.global_norm(grads)


def _active(module, tokens, positions):
    cfg = module.cfg
    b, s = tokens.shape
    h = module.embed(tokens, positions)
    valid = jnp.ones((b, s), bool)
    empty = jnp.zeros((b, s, cfg.num_key_value_heads, cfg.head_dim), h.dtype)
    fractions = []
    for layer in module.layers:
        h, ffn_in, _, _ = layer.attend(h, empty, empty, valid, 0, positions)
        out, scores = layer.ffn.activity(ffn_in)
        fractions.append((scores > 0).mean())
        h = layer.finish(h, out)
    return jnp.stack(fractions)


@functools.partial(jax.jit, static_argnums=0)
def active_fraction(cfg, params, windows):
    """Per layer, the fraction of FFN neurons that fire over windows [B, S+1]'s tokens."""
    tokens = windows[:, :-1]
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return decoder.module(cfg).apply({"params": params}, tokens, positions, method=_active)


def measure(cfg, params, windows: np.ndarray, batch: int) -> dict:
    ppl = tsm.evaluate(cfg, params, windows, batch)
    active = np.mean([np.asarray(active_fraction(cfg, params, jnp.asarray(windows[i:i + batch])))
                      for i in range(0, len(windows), batch)], axis=0)
    return {"heldout_ppl": round(ppl, 3), "sparsity": round(float(1 - active.mean()), 4),
            "sparsity_per_layer": [round(float(1 - a), 4) for a in active]}


def plot(log: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve, evals = log["loss_curve"], log["evals"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    steps = [c["step"] for c in curve]
    axes[0].plot(steps, [c["nll"] for c in curve], label="cross-entropy (train)")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("nats per token")
    ax2 = axes[0].twinx()
    ax2.plot(steps, [c["penalty"] for c in curve], color="tab:red", label="L1 penalty")
    ax2.set_ylabel("mean |FFN activation|", color="tab:red")
    axes[0].set_title("loss")
    e_steps = [e["step"] for e in evals]
    axes[1].plot(e_steps, [100 * e["sparsity"] for e in evals], marker="o")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("FFN neurons inactive per token (%)")
    axes[1].set_title("activation sparsity (held-out)")
    axes[2].plot(e_steps, [e["heldout_ppl"] for e in evals], marker="o")
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("perplexity")
    axes[2].set_title("held-out perplexity")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("hf_dir", type=Path, help="a SwiGLU (hidden_act silu) Llama-family checkpoint")
    p.add_argument("--text", type=Path, required=True, help="training text (documents "
                   "separated by blank lines)")
    p.add_argument("--heldout", type=Path, default=None, help="text for the periodic "
                   "perplexity and sparsity measurements (default: the end of --text)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work-dir", type=Path, default=None,
                   help="orbax checkpoints and logs (default: OUT.work)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--final-lr-frac", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--l1", type=float, default=1.0, help="final L1 coefficient")
    p.add_argument("--ramp", type=float, default=0.6,
                   help="fraction of the steps over which the L1 coefficient rises to --l1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop training (then export) after this much training wall time")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg_in, params, tokenizer = load_params(args.hf_dir)
    if cfg_in.activation != "silu":
        print(f"note: {args.hf_dir} has activation {cfg_in.activation!r}, not silu; it is "
              f"fine-tuned with ReLU and the penalty all the same", file=sys.stderr)
    cfg = relu_config(cfg_in)
    if tokenizer is None:
        raise ValueError(f"{args.hf_dir}: no tokenizer to read --text with")
    tc = tsm.TrainConfig(steps=args.steps, batch=args.batch, seq_len=args.seq_len,
                         peak_lr=args.lr, warmup_steps=args.warmup,
                         final_lr_frac=args.final_lr_frac, weight_decay=args.weight_decay,
                         clip_norm=args.clip, seed=args.seed)
    recipe = Recipe(l1=args.l1, ramp=args.ramp)
    train = tokenise(tokenizer, args.text, cfg.eos_token_id)
    if args.heldout is not None:
        heldout = tokenise(tokenizer, args.heldout, cfg.eos_token_id)
    else:
        cut = int(len(train) * 0.98)
        train, heldout = train[:cut], train[cut:]
    if len(train) < tc.seq_len + 2:
        raise ValueError(f"{args.text}: {len(train)} tokens, fewer than --seq-len + 2")
    opt = tsm.make_optimizer(tc)
    opt_state = opt.init(params)

    work = args.work_dir or args.out.with_name(args.out.name + ".work")
    spec = {"source": str(args.hf_dir.absolute()), "train": dataclasses.asdict(tc),
            "recipe": dataclasses.asdict(recipe), "text": str(args.text.absolute())}
    checkpoints = tsm.RunCheckpoints(work, spec)
    log = {"commands": [], "wall_s": 0.0, "loss_curve": [], "evals": []}
    resuming = checkpoints.latest is not None
    params, opt_state, log, start = checkpoints.resume(params, opt_state, log)
    if resuming:
        print(f"resumed from step {start}", flush=True)
    log["commands"].append(shlex.join([sys.executable, *sys.argv]))

    def save(step: int) -> None:
        checkpoints.save(step, params, opt_state, log)

    eval_windows = tsm.heldout_windows(heldout, tc.seq_len, args.eval_windows)
    if not log["evals"]:
        before = measure(cfg_in, params, eval_windows, tc.batch)
        after_swap = measure(cfg, params, eval_windows, tc.batch)
        log["source"] = before
        log["evals"].append({"step": 0, **after_swap})
        print(f"{cfg_in.activation}: held-out ppl {before['heldout_ppl']}, sparsity "
              f"{before['sparsity']:.1%}; swapped to relu: ppl {after_swap['heldout_ppl']}, "
              f"sparsity {after_swap['sparsity']:.1%}", flush=True)
    budget_s = None if args.max_minutes is None else 60 * args.max_minutes
    step, t_last = start, time.perf_counter()
    bar = tqdm(total=tc.steps, initial=start, desc="relufy", unit="step", mininterval=10)
    while step < tc.steps and (budget_s is None or log["wall_s"] < budget_s):
        params, opt_state, nll, penalty, gnorm = train_step(
            cfg, opt, recipe, tc.steps, params, opt_state, tsm.batch_at(train, tc, step),
            jnp.asarray(step, jnp.float32))
        step += 1
        if step % args.log_every == 0 or step == tc.steps:
            nll = float(nll)
            if not math.isfinite(nll):
                raise FloatingPointError(f"loss is {nll} at step {step}")
            log["loss_curve"].append({
                "step": step, "nll": round(nll, 4), "penalty": round(float(penalty), 5),
                "l1": float(recipe.coefficient(step - 1, tc.steps)),
                "grad_norm": round(float(gnorm), 3)})
            bar.set_postfix(nll=f"{nll:.3f}", l1=f"{float(penalty):.4f}")
        now = time.perf_counter()
        log["wall_s"] += now - t_last
        t_last = now
        bar.update(1)
        if step % args.eval_every == 0 or step == tc.steps:
            m = measure(cfg, params, eval_windows, tc.batch)
            log["evals"].append({"step": step, **m})
            tqdm.write(f"step {step}: held-out ppl {m['heldout_ppl']}, sparsity "
                       f"{m['sparsity']:.1%}")
            t_last = time.perf_counter()
        if step % args.ckpt_every == 0:
            save(step)
            t_last = time.perf_counter()
    bar.close()
    if step != checkpoints.latest:
        save(step)

    out = args.out
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    export_hf(params, cfg, tmp, dtype="float16", overwrite=True)
    for name in TOKENIZER_FILES:
        if (args.hf_dir / name).exists():
            shutil.copy2(args.hf_dir / name, tmp / name)
    final = log["evals"][-1]
    record = {"commands": log["commands"], "source": str(args.hf_dir), "train_config":
              dataclasses.asdict(tc), "recipe": dataclasses.asdict(recipe), "steps_done": step,
              "stopped_by": "steps" if step >= tc.steps else "max_minutes",
              "train_wall_s": round(log["wall_s"], 1), "before": log.get("source"),
              "final": final, "evals": log["evals"], "loss_curve": log["loss_curve"],
              "software": {"jax": jax.__version__, "optax": optax.__version__}}
    (tmp / "relufy_log.json").write_text(json.dumps(record, indent=2) + "\n")
    plot(log, tmp / "relufy_curves.png")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    print(f"relufied in {step} steps ({log['wall_s'] / 60:.1f} min): held-out ppl "
          f"{final['heldout_ppl']}, sparsity {final['sparsity']:.1%} -> {out}", flush=True)


if __name__ == "__main__":
    main()
