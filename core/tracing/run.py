"""Running a plan: one traced forward pass or one traced greedy generation, under the
model's lock, locally or on a remote server.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidParamsError
from ..models import ModelHandle, import_nnsight
from .batch import Batch
from .reads import HeadOutputs
from .sites import Intervention, Plan


@dataclass
class ForwardResult:
    """Logits at the requested positions and everything the captures recorded."""

    logits: torch.Tensor | None  # [b, n, vocab]
    records: dict

    def get(self, name: str, layer: int) -> torch.Tensor:
        return self.records[(name, layer)]

    def stacked(self, name: str, layers: Sequence[int]) -> torch.Tensor:
        """Records of one capture for several layers, stacked on a new dim 0."""
        return torch.stack([self.records[(name, layer)] for layer in layers])


def trace_kwargs(handle: ModelHandle) -> dict[str, Any]:
    return {"remote": handle.remote} if handle.remote else {}


def on_model_device(handle: ModelHandle, inputs: dict[str, torch.Tensor]) -> dict:
    """Inputs moved to the embedding's device (a sharded model moves activations
    between its layers itself); remote inputs stay where they are for the server."""
    if handle.remote:
        return inputs
    device = handle.device
    return {name: value.to(device) for name, value in inputs.items()}


def on_cpu(value: Any) -> Any:
    """Saved values brought back to the CPU, where analyses combine them."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {key: on_cpu(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(on_cpu(item) for item in value)
    if isinstance(value, list):
        return [on_cpu(item) for item in value]
    return value


def forward(
    handle: ModelHandle,
    batch: Batch,
    items: Sequence[Intervention] = (),
    logits_at: Sequence[int] | None = (-1,),
) -> ForwardResult:
    """One forward pass with interventions and captures; logits at `logits_at`.

    `logits_at=None` skips reading logits (the model still computes the last one).
    """
    plan = Plan(handle, batch, items)
    inputs = on_model_device(handle, batch.model_inputs())
    last_only = logits_at is not None and list(logits_at) == [-1]
    if logits_at is None or last_only:
        inputs["logits_to_keep"] = 1
    cols = batch.absolute(list(logits_at)) if logits_at is not None and not last_only else None
    with handle.lock:
        saved = _trace_forward(
            handle.model, inputs, plan, logits_at is not None, cols, trace_kwargs(handle)
        )
    saved = on_cpu(list(saved))
    records = saved[0]
    return ForwardResult(saved[1] if logits_at is not None else None, records)


def _trace_forward(root, inputs, plan, read_logits, cols, trace_kwargs) -> list:
    # Every local here is serialised with the trace for remote runs: keep them
    # to the model envoy, tensors and the plan.
    nnsight = import_nnsight()
    with root.trace(inputs, **trace_kwargs):
        saved = nnsight.save(list())
        saved.append(plan.visit(root, 0))
        if read_logits:
            logits = plan.adapter.lm_head(root).output
            if cols is None:
                saved.append(logits[:, -1:].detach())
            else:
                picked = [logits[row, cols[row]] for row in range(logits.shape[0])]
                saved.append(torch.stack(picked).detach())
    return saved


@dataclass
class GenerationResult:
    """Greedy continuation per prompt, with what the captures recorded at each step.

    `steps[t]` holds the records of the forward that produced token t (step 0 is the
    prefill). Rows that stopped early have fewer tokens; their later records are
    meaningless and `tokens` is already cut at the stop token (kept).
    """

    tokens: list[list[int]]
    steps: list[dict]
    stopped: list[bool]

    def text(self, handle: ModelHandle, row: int = 0) -> str:
        return handle.decode(self.tokens[row])


def stop_token_ids(handle: ModelHandle, stop_at_newline: bool = False) -> list[int]:
    """End-of-sequence ids, plus every token containing a newline when asked."""
    tokenizer = handle.tokenizer
    ids = set()
    eos = handle.hf_model.generation_config.eos_token_id
    for value in (eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    if stop_at_newline:
        ids.update(newline_token_ids(tokenizer))
    return sorted(ids)


_NEWLINE_CACHE: dict[int, list[int]] = {}


def newline_token_ids(tokenizer: Any) -> list[int]:
    """Ids whose decoded text contains a newline, found from the vocabulary."""
    key = id(tokenizer)
    if key not in _NEWLINE_CACHE:
        vocab = tokenizer.get_vocab()
        found = [i for i in vocab.values() if "\n" in tokenizer.decode([i])]
        _NEWLINE_CACHE[key] = sorted(found)
    return _NEWLINE_CACHE[key]


def generate(
    handle: ModelHandle,
    batch: Batch,
    max_new_tokens: int,
    items: Sequence[Intervention] = (),
    stop_ids: Sequence[int] | None = None,
) -> GenerationResult:
    """Greedy decoding with interventions active at the prefill and every step."""
    from transformers import GenerationConfig

    if max_new_tokens < 1:
        raise InvalidParamsError("max_new_tokens must be at least 1")
    handle.check_length(batch.width + max_new_tokens, "prompt plus generated tokens")
    plan = Plan(handle, batch, items)
    stops = list(stop_ids) if stop_ids is not None else stop_token_ids(handle)
    pad_id = handle.tokenizer.pad_token_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=stops or None,
        pad_token_id=pad_id if pad_id is not None else (stops[0] if stops else 0),
    )
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    inputs = on_model_device(handle, inputs)
    with handle.lock, warnings.catch_warnings():
        # A bounded step loop ends with a warning when every row stops early.
        warnings.filterwarnings("ignore", message=".*was never reached.*")
        saved = _trace_generate(
            handle.model, inputs, config, plan, max_new_tokens, trace_kwargs(handle)
        )
    return _collect_generation(on_cpu(list(saved)), batch.size, set(stops))


def _trace_generate(root, inputs, config, plan, max_new_tokens, trace_kwargs) -> list:
    nnsight = import_nnsight()
    with root.generate(inputs, generation_config=config, **trace_kwargs) as tracer:
        saved = nnsight.save(list())
        for step in tracer.iter[:max_new_tokens]:
            record = plan.visit(root, step)
            logits = plan.adapter.lm_head(root).output
            saved.append((logits[:, -1].argmax(-1).detach(), record))
    return saved


def _collect_generation(saved: list, rows: int, stops: set[int]) -> GenerationResult:
    tokens: list[list[int]] = [[] for _ in range(rows)]
    stopped = [False] * rows
    steps = []
    for chosen, record in saved:
        steps.append(record)
        for row in range(rows):
            if not stopped[row]:
                token = int(chosen[row])
                tokens[row].append(token)
                stopped[row] = token in stops
    return GenerationResult(tokens, steps, stopped)


def mean_head_outputs(handle: ModelHandle, batch: Batch, layers: Sequence[int]) -> dict:
    """Mean per-head output over every real token of a reference batch: layer -> [H, hd]."""
    capture = HeadOutputs(list(layers), reduce="mean", name="mean")
    result = forward(handle, batch, [capture], logits_at=None)
    weights = torch.tensor(batch.lengths, dtype=torch.float32)[:, None, None]
    means = {}
    for layer in layers:
        per_row = result.get("mean", layer)
        means[layer] = (per_row * weights).sum(0) / weights.sum()
    return means
