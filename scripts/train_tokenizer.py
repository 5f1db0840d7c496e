"""Train a byte-level BPE tokenizer on the corpus and tokenise it.

Reads <corpus>/train.txt and <corpus>/heldout.txt (documents separated by a
blank line, as written by scripts/make_corpus.py) and:
  1. trains a byte-level BPE (ByteLevel pre-tokenizer and decoder, no
     normaliser) on train.txt only; special tokens follow OPT's ids:
     <s>=0, <pad>=1, </s>=2 (used as both bos and eos), <unk>=3. The
     post-processor adds no special tokens (the model code prepends bos);
  2. checks decode(encode(text)) == text on every heldout document;
  3. writes <corpus>/{train,heldout}.u16.npy: uint16 token ids, documents
     joined with the eos id 2 between them;
  4. fits an add-one smoothed unigram model on the train ids and reports its
     heldout perplexity (exp of the mean NLL per heldout token) and bits/byte.

Outputs: <out>/tokenizer.json, <out>/stats.json, <corpus>/*.u16.npy
Run:  python scripts/train_tokenizer.py --corpus data/corpus --out data/tokenizer
"""
import argparse
import json
import os
import sys
import time

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0, 1, 2, 3 as in OPT
PAD_ID, EOS_ID = 1, 2  # OPT: bos_token_id = eos_token_id = 2, pad_token_id = 1


def read_docs(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in f.read().split("\n\n") if d.strip()]


def train_tokenizer(docs, vocab_size):
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # ByteLevel post-processor only fixes offsets: it adds no special tokens.
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True)
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


def encode_docs(tok, docs, desc, chunk=64):
    """Token ids of each document (encode_batch over chunks, parallel in Rust)."""
    out = []
    with tqdm(total=sum(len(d) for d in docs), desc=desc, unit="char",
              unit_scale=True, mininterval=1.0) as bar:
        for i in range(0, len(docs), chunk):
            batch = docs[i:i + chunk]
            out += [np.asarray(e.ids, dtype=np.uint16)
                    for e in tok.encode_batch(batch, add_special_tokens=False)]
            bar.update(sum(len(d) for d in batch))
    return out


def join_with_eos(doc_ids):
    parts = []
    for i, ids in enumerate(doc_ids):
        parts += [np.array([EOS_ID], np.uint16)] * (i > 0) + [ids]
    return np.concatenate(parts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default="data/corpus")
    ap.add_argument("--out", default="data/tokenizer")
    ap.add_argument("--vocab-size", type=int, default=4096)
    args = ap.parse_args()
    assert args.vocab_size <= 65536, "ids are stored as uint16"
    os.makedirs(args.out, exist_ok=True)
    times, t = {}, time.time()
    t_start = t
    train_docs = read_docs(os.path.join(args.corpus, "train.txt"))
    held_docs = read_docs(os.path.join(args.corpus, "heldout.txt"))

    tok = train_tokenizer(train_docs, args.vocab_size)
    tok_path = os.path.join(args.out, "tokenizer.json")
    tok.save(tok_path)
    tok = Tokenizer.from_file(tok_path)  # check what we saved is what we use
    vocab = tok.get_vocab_size()
    times["train_tokenizer_s"] = round(time.time() - t, 1)
    print(f"vocab size {vocab}; saved {tok_path} ({times['train_tokenizer_s']}s)")
    sample = "Hello world.\n  def f(x): return x"
    assert tok.encode(sample).ids == tok.encode(sample, add_special_tokens=True).ids
    assert not set(tok.encode(sample).ids) & {0, 1, 2, 3}, "post-processor adds tokens"

    t = time.time()
    held_ids = encode_docs(tok, held_docs, "heldout")
    train_ids = encode_docs(tok, train_docs, "train")
    times["encode_s"] = round(time.time() - t, 1)
    t = time.time()
    for doc, ids in zip(held_docs, held_ids):  # round trip on every heldout doc
        assert tok.decode(ids.tolist(), skip_special_tokens=False) == doc
    paras = [p for d in held_docs for p in d.split("\n") if len(p) > 60]
    for para in paras[::max(1, len(paras) // 5)][:5]:  # a few spread-out paragraphs
        ids = tok.encode(para).ids
        assert tok.decode(ids) == para
        print(f"round trip ok ({len(ids)} tokens): {para[:70]!r}")
    times["roundtrip_check_s"] = round(time.time() - t, 1)

    stats = {"vocab_size": vocab, "special_tokens": {t: i for i, t in enumerate(SPECIAL_TOKENS)},
             "bos_id": EOS_ID, "eos_id": EOS_ID, "pad_id": PAD_ID}
    arrays = {}
    for split, docs, ids in [("train", train_docs, train_ids), ("heldout", held_docs, held_ids)]:
        arr = arrays[split] = join_with_eos(ids)
        np.save(os.path.join(args.corpus, f"{split}.u16.npy"), arr)
        n_bytes = sum(len(d.encode()) for d in docs)
        stats[split] = {"documents": len(docs), "bytes": n_bytes, "tokens": int(arr.size),
                        "tokens_per_byte": round(sum(i.size for i in ids) / n_bytes, 4)}
        print(f"{split}: {len(docs)} docs, {n_bytes / 1e6:.2f} MB, {arr.size:,} tokens, "
              f"{stats[split]['tokens_per_byte']:.4f} tokens/byte")

    counts = np.bincount(arrays["train"], minlength=vocab).astype(np.float64)
    logp = np.log((counts + 1.0) / (counts.sum() + vocab))  # add-one smoothing
    nll = -logp[arrays["heldout"]]
    stats["unigram_heldout"] = {
        "perplexity_per_token": round(float(np.exp(nll.mean())), 2),
        "nll_nats_per_token": round(float(nll.mean()), 4),
        "bits_per_byte": round(float(nll.sum() / np.log(2) / stats["heldout"]["bytes"]), 4)}
    times["total_s"] = round(time.time() - t_start, 1)
    stats["timings"] = times
    stats["command"] = " ".join(["python"] + sys.argv)
    stats["args"] = vars(args)
    print(f"unigram heldout perplexity {stats['unigram_heldout']['perplexity_per_token']} "
          f"({stats['unigram_heldout']['bits_per_byte']} bits/byte)")
    with open(os.path.join(args.out, "stats.json"), "w") as f:
        json.dump(stats, f, indent=2)


if __name__ == "__main__":
    main()
