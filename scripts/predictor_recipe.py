"""End-to-end recipe for activation predictors: collect -> train -> evaluate.

    python scripts/predictor_recipe.py MODEL_DIR --train-text TRAIN --heldout-text HELDOUT \
        [--tokens 100000] [--rank R] [--steps 2000] [--target-recall 0.99]
        [--dram-budget 50%] [--window 4]

MODEL_DIR is a converted flashjax model with a tokenizer. The three steps are the same as
`flashjax collect`, `flashjax train-predictors` and `flashjax eval`; each is timed, and the
evaluation is written to MODEL_DIR/predictors/eval.json. Adapt the settings here.
"""

import argparse
import json
import time
from pathlib import Path

import flashjax
from flashjax.predictor.collect import collect
from flashjax.predictor.evaluate import evaluate
from flashjax.predictor.train import train_predictors


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--train-text", required=True)
    parser.add_argument("--heldout-text", required=True)
    parser.add_argument("--data", type=Path, help="activation directory (default: beside the model)")
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--target-recall", type=float, default=0.99,
                        help="recall each layer's threshold is set for on the validation split")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--dram-budget", default="50%")
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    data = args.data or args.model_dir.with_name(args.model_dir.name + ".activations")
    times = {}

    t0 = time.perf_counter()
    model = flashjax.load(args.model_dir)
    meta = collect(model, args.train_text, data, tokens=args.tokens, seq_len=args.seq_len)
    times["collect_s"] = time.perf_counter() - t0
    print(f"collected {meta['tokens_written']} tokens in {times['collect_s']:.0f} s")

    t0 = time.perf_counter()
    summary = train_predictors(args.model_dir, data, rank=args.rank, steps=args.steps,
                               target_recall=args.target_recall, overwrite=args.overwrite)
    times["train_s"] = time.perf_counter() - t0
    print(f"trained in {times['train_s']:.0f} s: held-out recall {summary['recall']:.4f}, "
          f"predicted {summary['predicted_active_fraction']:.4f} vs true "
          f"{summary['true_active_fraction']:.4f} active")

    t0 = time.perf_counter()
    result = evaluate(args.model_dir, args.heldout_text, dram_budget=args.dram_budget,
                      window=args.window, tokens=args.eval_tokens, seq_len=args.seq_len)
    times["eval_s"] = time.perf_counter() - t0
    result["times"] = times
    out = args.model_dir / "predictors" / "eval.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"perplexity dense {result['ppl_dense']:.3f}, flash {result['ppl_sparse']:.3f} "
          f"({(result['ppl_ratio'] - 1) * 100:+.2f}%); recall {result['recall']:.4f}; "
          f"flash {result['flash_bytes_per_token'] / 1e3:.1f} kB/token -> {out}")


if __name__ == "__main__":
    main()
