"""Check and measure an exported checkpoint (by default the shipped one).

    python scripts/evaluate_shipped_model.py checkpoints/flashjax-docs-9m

1. transformers' ``OPTForCausalLM`` loads the directory; its float32 logits on a heldout window
   match flashjax's (the float16 file converted with ``flashjax.convert`` and run in float32):
   relative L2 error, and the largest per-token KL.
2. Heldout perplexity of the float16 weights over non-overlapping ``--seq-len`` windows (the
   windows ``train_shipped_model.py`` evaluates on), against the unigram baseline.
3. Samples: a few prompts continued with temperature 0.8, top_p 0.9 by ``Model.generate``.
4. FFN activation sparsity per layer: the fraction of neurons whose ReLU pre-activation is > 0,
   per token, averaged over heldout tokens (the fraction a perfect predictor would have to load).

Prints a JSON report and writes it to ``--report`` if given.

Shape legend: W windows, S seq_len, V vocabulary, L layers, N ffn_dim.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import flashjax
from flashjax.predictor.collect import ffn_activations

PROMPTS = ("The Python interpreter", "To create a new table", "In Django, a model")


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def hf_parity(hf_dir: Path, model, window: np.ndarray) -> dict:
    import torch
    from transformers import OPTForCausalLM

    ref = OPTForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32,
                                         attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = ref(torch.tensor(window[None])).logits.numpy()[0]
    ours = np.asarray(model.logits(window[None].tolist()))[0]
    p, q = log_softmax(theirs.astype(np.float64)), log_softmax(ours.astype(np.float64))
    return {"tokens": int(len(window)),
            "rel_l2": float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)),
            "max_token_kl": float((np.exp(p) * (p - q)).sum(-1).max())}


def windows(heldout: np.ndarray, seq_len: int) -> np.ndarray:
    """[W, S+1]: window i covers tokens [i*S, (i+1)*S]."""
    n = (len(heldout) - 1) // seq_len
    return heldout[np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]].astype(np.int32)


def heldout_stats(cfg, params, wins: np.ndarray, batch: int) -> tuple[float, list[float]]:
    """(perplexity, per-layer mean fraction of active FFN neurons) over all windows."""
    total, active, count = 0.0, np.zeros(cfg.num_hidden_layers), 0
    for i in range(0, len(wins), batch):
        w = wins[i:i + batch]
        _, bits, logits = ffn_activations(cfg, params, jnp.asarray(w[:, :-1]))
        logp = jax.nn.log_softmax(logits)
        total -= float(jnp.take_along_axis(logp, jnp.asarray(w[:, 1:, None]), -1).sum())
        # bits [L, B, S, N/8]: active neurons per layer, summed over tokens
        active += np.bitwise_count(np.asarray(bits)).sum(axis=(1, 2, 3)) / cfg.ffn_dim
        count += w.shape[0] * (w.shape[1] - 1)
    return math.exp(total / count), (active / count).tolist()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("hf_dir", nargs="?", default="checkpoints/flashjax-docs-9m")
    p.add_argument("--heldout", default="data/corpus/heldout.u16.npy")
    p.add_argument("--unigram-stats", default="data/tokenizer/stats.json")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", default=None)
    args = p.parse_args(argv)

    hf_dir = Path(args.hf_dir)
    heldout = np.load(args.heldout)
    wins = windows(heldout, args.seq_len)
    report: dict = {"checkpoint": str(hf_dir), "command": " ".join(["python", *sys.argv])}
    with tempfile.TemporaryDirectory() as tmp:
        flashjax.convert(hf_dir, Path(tmp) / "model", progress=False)
        model = flashjax.load(Path(tmp) / "model", dtype=jnp.float32, progress=False)
        report["hf_parity"] = hf_parity(hf_dir, model, wins[0][:-1])
        ppl, active = heldout_stats(model.cfg, model.params, wins, args.batch)
        report["heldout"] = {"perplexity": ppl, "windows": int(len(wins)),
                             "tokens": int(len(wins) * args.seq_len),
                             "weights": "float16 file, computed in float32"}
        stats = Path(args.unigram_stats)
        if stats.exists():
            tok = json.loads(stats.read_text())
            report["heldout"]["unigram_perplexity"] = tok["unigram_heldout"]["perplexity_per_token"]
            tokens_per_byte = tok["heldout"]["tokens_per_byte"]
            report["heldout"]["bits_per_byte"] = math.log2(ppl) * tokens_per_byte
            report["heldout"]["unigram_bits_per_byte"] = tok["unigram_heldout"]["bits_per_byte"]
        report["ffn_active_fraction_per_layer"] = [round(a, 4) for a in active]
        report["ffn_active_fraction_mean"] = round(float(np.mean(active)), 4)
        report["samples"] = []
        for i, prompt in enumerate(PROMPTS):
            ids = model.generate(model.encode(prompt), max_new_tokens=args.new_tokens,
                                 temperature=0.8, top_p=0.9, seed=args.seed + i)
            report["samples"].append({"prompt": prompt, "seed": args.seed + i,
                                      "temperature": 0.8, "top_p": 0.9,
                                      "continuation": model.decode(ids)})
    text = json.dumps(report, indent=2, ensure_ascii=False)
    print(text)
    if args.report:
        Path(args.report).write_text(text + "\n")


if __name__ == "__main__":
    main()
