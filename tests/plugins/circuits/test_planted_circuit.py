"""sae-circuit recovers a circuit planted by hand in a tiny model.

The weights of a fresh tiny Llama are set so that a chosen set of heads alone
carries the task signal: each planted head attends uniformly (its queries are
zero), reads how much of the signal token and of its stand-in the prompt holds
(its values), and writes them onto the answer's and the distractor's
unembeddings (its output slice). Every other
head's output slice is scaled down a thousandfold, so it barely moves the
residual stream. Clean prompts contain the signal token, corrupted ones a
stand-in of the same length. sae-circuit must rank the planted heads first;
head-patching, computed in the same run, confirms that they carry the task.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from headscope.core.analysis import RunContext
from headscope.core.models import load_model
from headscope.core.plugins import build_registry
from headscope.plugins.circuits.sae_circuit import SaeCircuit, SaeCircuitParams

SIGNAL, STAND_IN = "z", "q"


def _pairs(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnoprstuvwxy")
    rows = []
    for _ in range(n):
        body = rng.choice(letters, size=14).tolist()
        for position in rng.choice(14, size=int(rng.integers(3, 7)), replace=False):
            body[position] = SIGNAL
        clean = "".join(body)
        rows.append(
            {
                "prompt": clean,
                "answer": SIGNAL,
                "distractor": STAND_IN,
                "corrupted": clean.replace(SIGNAL, STAND_IN),
            }
        )
    return rows


def _plant(handle, planted: set[tuple[int, int]]) -> None:
    model = handle.hf_model
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    ids = [handle.tokenizer.convert_tokens_to_ids(t) for t in (SIGNAL, STAND_IN)]
    normalize = torch.nn.functional.normalize
    reads = normalize(model.model.embed_tokens.weight[ids], dim=-1)  # [2, d]
    writes = normalize(model.lm_head.weight[ids], dim=-1)  # [2, d]
    carriers = torch.eye(head_dim)[:2]  # [2, head_dim]
    with torch.no_grad():
        for layer, block in enumerate(model.model.layers):
            attention = block.self_attn
            for head in range(model.config.num_attention_heads):
                rows = slice(head * head_dim, (head + 1) * head_dim)
                if (layer, head) not in planted:
                    attention.o_proj.weight[:, rows] *= 1e-3
                    continue
                kv = slice((head // group) * head_dim, (head // group + 1) * head_dim)
                attention.q_proj.weight[rows] = 0.0  # uniform attention
                attention.v_proj.weight[kv] = 20.0 * carriers.T @ reads
                attention.o_proj.weight[:, rows] = 20.0 * writes.T @ carriers


@pytest.mark.parametrize("planted", [{(0, 1), (2, 2)}, {(1, 0), (2, 3)}])
def test_planted_heads_rank_first(tmp_path, planted):
    task = tmp_path / "planted.jsonl"
    task.write_text("".join(json.dumps(row) + "\n" for row in _pairs(12)))
    handle = load_model("tiny-llama")  # a fresh copy: its weights are changed
    _plant(handle, planted)
    params = SaeCircuitParams(
        task=f"jsonl:{task}",
        n_examples=12,
        seeds=2,
        reference="auto",
        reference_top_k=len(planted),
        reference_examples=12,
    )
    ctx = RunContext(lambda: handle, seed=0, registry=build_registry())
    finding = SaeCircuit().run(ctx, params)

    scores = {(lay, h): v for lay, h, metric, v in finding.head_scores if metric == "unique_codes"}
    ranked = sorted(scores, key=lambda head: (-scores[head], head))
    assert set(ranked[: len(planted)]) == planted, scores
    # the construction is a circuit: patching finds the same heads, and the
    # SAE ranking recovers them on each seed too
    assert set(map(tuple, finding.summary["reference"]["top_heads"])) == planted
    assert finding.metrics["auc_mean"] >= 0.95
    assert finding.metrics["metric_clean"] > finding.metrics["metric_corrupted"]
