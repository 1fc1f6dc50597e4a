"""Retrieval scoring on a Llama-3.1-8B-shaped model at 8k and 32k tokens, on one GPU.

    .venv/bin/python bench/gpu_check.py            # GPU: Llama-3.1-8B shape, bfloat16
    .venv/bin/python bench/gpu_check.py --small    # CPU: a small shape, to check it runs

The model is randomly initialised from the shape alone (no download, no network:
only torch, transformers, accelerate and headscope). Prompts are random token ids
with the last few repeating an earlier stretch, so some heads have something to
copy. For each length it scores one prompt with headscope (fast prefill, rows from
q and k, float32 argmax) and with the published approach (`bench/published.py`),
and prints the time, the peak memory each added and whether both chose the same
argmax for every head at every step. One short run; the lengths and the number of
decoding steps are options.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from published import published_argmax  # noqa: E402

LLAMA_31_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
SMALL = {
    **LLAMA_31_8B,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": 1024,
}


def build(shape: dict, device: torch.device, dtype: torch.dtype):
    """A random Llama of `shape` on `device`, wrapped as a headscope handle."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from headscope.core.architectures import adapter_for
    from headscope.core.model_sources import TinyRandom
    from headscope.core.models import ModelHandle, ModelSpec, _wrap
    from headscope.core.tiny import byte_tokenizer

    config = LlamaConfig(**shape, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    torch.manual_seed(0)
    with torch.device(device):
        hf_model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    hf_model.eval()
    tokenizer = byte_tokenizer()  # ids only: prompts are made of token ids
    name = "random-llama-3.1-8b-shape"
    return ModelHandle(
        name=name,
        spec=ModelSpec(name, TinyRandom("llama")),
        model=_wrap(hf_model, tokenizer),
        tokenizer=tokenizer,
        adapter=adapter_for(hf_model.config),
        revision="random",
        load_seconds=0.0,
    )


def prompt(length: int, vocab: int, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (length,), generator=generator)
    stretch = min(16, length // 4)
    ids[-stretch:] = ids[length // 2 : length // 2 + stretch]  # a stretch to copy from
    return ids.tolist()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> int:
    """Start a new peak; returns the memory in use now."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return int(torch.cuda.memory_allocated(device))
    with open("/proc/self/clear_refs", "w") as refs:  # resets VmHWM to the current RSS
        refs.write("5")
    return _status("VmRSS")


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return _status("VmHWM")


def headscope_argmax(handle, ids: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    from headscope.core import tracing as T

    batch = T.make_batch(handle, [ids])
    layers = list(range(handle.n_layers))
    rows = T.AttentionRows(layers, [-1], output="argmax")
    result = T.generate(handle, batch, steps, [rows], stop_ids=[])
    argmax = torch.stack(
        [
            torch.stack([result.steps[t][("rows", layer)][0, :, 0].cpu() for layer in layers])
            for t in range(len(result.tokens[0]))
        ]
    )
    return result.tokens[0], argmax


def measure(name: str, run, device: torch.device) -> dict:
    base = _reset_peak(device)
    _sync(device)
    started = time.perf_counter()
    tokens, argmax = run()
    _sync(device)
    seconds = time.perf_counter() - started
    return {"name": name, "seconds": seconds, "peak_gib": (_peak(device) - base) / 2**30,
            "tokens": tokens, "argmax": argmax}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", action="store_true", help="small shape, float32, on CPU")
    parser.add_argument("--lengths", default=None, help="comma-separated (default 8192,32768)")
    parser.add_argument("--steps", type=int, default=8, help="decoding steps per prompt")
    args = parser.parse_args()
    if args.small:
        shape, device, dtype = SMALL, torch.device("cpu"), torch.float32
        lengths = [int(n) for n in (args.lengths or "512,2048").split(",")]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no GPU here: run with --small to check the script on CPU")
        shape, device, dtype = LLAMA_31_8B, torch.device("cuda"), torch.bfloat16
        lengths = [int(n) for n in (args.lengths or "8192,32768").split(",")]
    started = time.perf_counter()
    handle = build(shape, device, dtype)
    print(
        f"random Llama ({shape['num_hidden_layers']} layers, {shape['num_attention_heads']}q/"
        f"{shape['num_key_value_heads']}kv heads, hidden {shape['hidden_size']}) in {dtype} on "
        f"{device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
        f"built in {time.perf_counter() - started:.1f}s; torch {torch.__version__}",
        flush=True,
    )
    ids = prompt(32, shape["vocab_size"])
    headscope_argmax(handle, ids, 2)  # warm-up both paths
    published_argmax(handle.hf_model, ids, 2, [])
    report = []
    for length in lengths:
        ids = prompt(length, shape["vocab_size"])
        ours = measure(
            "headscope", lambda ids=ids: headscope_argmax(handle, ids, args.steps), device
        )
        theirs = measure(
            "published",
            lambda ids=ids: published_argmax(handle.hf_model, ids, args.steps, []),
            device,
        )
        same = ours["tokens"] == theirs["tokens"] and torch.equal(ours["argmax"], theirs["argmax"])
        agree = (
            float((ours["argmax"] == theirs["argmax"]).double().mean())
            if len(ours["tokens"]) == len(theirs["tokens"])
            else 0.0
        )
        line = {
            "length": length,
            "steps": args.steps,
            "headscope_s": round(ours["seconds"], 2),
            "published_s": round(theirs["seconds"], 2),
            "speedup": round(theirs["seconds"] / ours["seconds"], 2),
            "headscope_peak_gib": round(ours["peak_gib"], 2),
            "published_peak_gib": round(theirs["peak_gib"], 2),
            "identical_argmax": same,
            "argmax_agreement": round(agree, 4),
        }
        report.append(line)
        print(json.dumps(line), flush=True)
    print(json.dumps({"device": str(device), "dtype": str(dtype), "results": report}))


if __name__ == "__main__":
    main()
