"""What users would run instead of flashjax, on the same Hugging Face checkpoint and prompt.

* ``accelerate-offload``: transformers with accelerate's disk offload (``device_map="auto"``,
  ``max_memory={"cpu": ...}``, ``offload_folder``), float32 on the CPU: the layers that do not
  fit ``max_memory`` are read back from the offload folder on every token.
* ``mmap``: the checkpoint's safetensors memory-mapped (safetensors maps the file and hands out
  views of it, nothing is copied) as the parameters of a transformers model in the file's own
  dtype, with no budget of its own: the page cache decides what stays in memory, as with
  llama.cpp's default memory-mapped loading.

Each runs greedy decoding with the KV cache, timing every decode step and counting the bytes
the kernel read from storage during it (``/proc/self/io``). This module is imported only by a
benchmark worker process (``flashjax.bench.worker``) and needs the ``peers`` extra (torch,
transformers, accelerate); the library never imports it.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

PEERS = ("accelerate-offload", "mmap")


def storage_read_bytes() -> int:
    """Bytes this process has had read from storage so far (the page cache's hits excluded)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no read_bytes line")


def greedy(model, prompt_ids: list[int], tokens: int, on_token=None) -> dict:
    """Greedy decoding of ``tokens`` tokens with the KV cache; per decode step its wall time
    and the storage bytes read during it."""
    import torch

    ids, step_s, step_bytes = [], [], []
    with torch.inference_mode():
        out = model(torch.tensor([prompt_ids]), use_cache=True)
        for i in range(tokens):
            next_id = int(out.logits[0, -1].argmax())
            ids.append(next_id)
            if on_token is not None:
                on_token(next_id)
            if i == tokens - 1:
                break
            start, read = time.perf_counter(), storage_read_bytes()
            out = model(torch.tensor([[next_id]]), past_key_values=out.past_key_values,
                        use_cache=True)
            step_s.append(time.perf_counter() - start)
            step_bytes.append(storage_read_bytes() - read)
    return {"ids": ids, "step_s": step_s, "step_storage_bytes": step_bytes}


def summary(run: dict, load_s: float) -> dict:
    steps = np.array(run["step_s"]) if run["step_s"] else np.zeros(1)
    return {"ms_per_token": float(np.median(steps) * 1e3),
            "wall_ms_per_token": float(np.median(steps) * 1e3),
            "storage_bytes_per_token": float(np.mean(run["step_storage_bytes"] or [0])),
            "ids": run["ids"], "tokens": len(run["ids"]), "load_s": load_s}


def accelerate_offload(hf_dir, prompt_ids, tokens: int, max_memory: int, offload_dir,
                       on_token=None) -> dict:
    """transformers + accelerate disk offload, float32, ``max_memory`` bytes of CPU memory."""
    import torch
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        hf_dir, device_map="auto", max_memory={"cpu": int(max_memory)},
        offload_folder=str(offload_dir), dtype=torch.float32)
    model.eval()
    placement = getattr(model, "hf_device_map", {}) or {}
    load_s = time.perf_counter() - start
    result = summary(greedy(model, prompt_ids, tokens, on_token), load_s)
    result.update(max_memory_bytes=int(max_memory), compute_dtype="float32",
                  modules_on_disk=sum(1 for v in placement.values() if v == "disk"),
                  modules_in_memory=sum(1 for v in placement.values() if v != "disk"))
    return result


def mmap_weights(hf_dir, prompt_ids, tokens: int, on_token=None) -> dict:
    """A transformers model whose parameters are views of the memory-mapped safetensors."""
    import torch
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    start = time.perf_counter()
    hf_dir = Path(hf_dir)
    config = AutoConfig.from_pretrained(hf_dir)
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{hf_dir}: no *.safetensors files to map")
    tensors, dtypes = {}, set()
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)  # a view of the mapped file
                dtypes.add(tensors[key].dtype)
    dtype = max(dtypes, key=lambda d: torch.finfo(d).bits if d.is_floating_point else 0)
    with init_empty_weights():  # parameters on the meta device, buffers (rope) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    expected = dict(model.named_parameters())
    state = {}
    for key, value in tensors.items():
        name = key if key in expected else next(
            (n for n in (f"model.{key}", key.removeprefix("model.")) if n in expected), None)
        if name is not None:
            state[name] = value
    missing = model.load_state_dict(state, strict=False, assign=True).missing_keys
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [m for m in missing if not m.endswith("lm_head.weight")]
    if missing:
        raise ValueError(f"{hf_dir}: the checkpoint has no tensors for {missing[:4]}"
                         f"{' ...' if len(missing) > 4 else ''}")
    model.eval()
    load_s = time.perf_counter() - start
    result = summary(greedy(model, prompt_ids, tokens, on_token), load_s)
    result.update(compute_dtype=str(dtype).removeprefix("torch."))
    return result
