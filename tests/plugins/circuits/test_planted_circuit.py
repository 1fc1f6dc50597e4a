"""sae-circuit recovers a circuit planted by hand in a tiny model.

The weights of a fresh tiny Llama are set so that a chosen set of heads alone
carries the task signal: each planted head attends uniformly (its queries are
zero), reads the signal token's embedding minus its stand-in's (its values), and
writes that onto the answer's unembedding minus the distractor's (its output
slice). Every other head's output slice, and every MLP's output, is zeroed, so
nothing else writes to the residual stream. Clean
prompts contain the signal token (always first), corrupted ones the stand-in in
its places: a planted head writes one direction on clean prompts and the
opposite on corrupted ones. sae-circuit must rank the planted heads first;
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
        body[0] = SIGNAL
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
    embed, unembed = model.model.embed_tokens.weight, model.lm_head.weight
    reads = normalize(embed[ids[0]] - embed[ids[1]], dim=0)
    writes = normalize(unembed[ids[0]] - unembed[ids[1]], dim=0)
    carrier = torch.eye(head_dim)[0]
    with torch.no_grad():
        for layer, block in enumerate(model.model.layers):
            block.mlp.down_proj.weight.zero_()
            attention = block.self_attn
            for head in range(model.config.num_attention_heads):
                rows = slice(head * head_dim, (head + 1) * head_dim)
                if (layer, head) not in planted:
                    attention.o_proj.weight[:, rows] = 0.0
                    continue
                kv = slice((head // group) * head_dim, (head // group + 1) * head_dim)
                attention.q_proj.weight[rows] = 0.0  # uniform attention
                attention.v_proj.weight[kv] = 4.0 * torch.outer(carrier, reads)
                attention.o_proj.weight[:, rows] = 2.0 * torch.outer(writes, carrier)


@pytest.mark.parametrize("scaling", ["unit", "global"])
@pytest.mark.parametrize("planted", [{(0, 1), (2, 2)}, {(1, 0), (2, 3)}])
def test_planted_heads_rank_first(tmp_path, planted, scaling):
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
        scaling=scaling,
    )
    ctx = RunContext(lambda: handle, seed=0, registry=build_registry())
    finding = SaeCircuit().run(ctx, params)

    scores = {(lay, h): v for lay, h, metric, v in finding.head_scores if metric == "unique_codes"}
    ranked = sorted(scores, key=lambda head: (-scores[head], head))
    assert set(ranked[: len(planted)]) == planted, scores
    # the construction is a circuit: patching finds the same heads
    assert set(map(tuple, finding.summary["reference"]["top_heads"])) == planted
    assert finding.metrics["auc_of_mean_scores"] == 1.0
    if scaling == "global":
        # every other head's output is small here, so keeping relative norms
        # recovers the circuit on each seed alone; unit length needs the seed mean
        assert finding.metrics["auc_mean"] >= 0.95
    assert finding.metrics["metric_clean"] > finding.metrics["metric_corrupted"]
