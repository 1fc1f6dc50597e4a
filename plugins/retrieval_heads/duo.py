"""DuoAttention's gate optimisation (Xiao et al. 2024): which KV heads need the full cache.

Every KV head gets a gate alpha in [0, 1], shared by the query heads that read it.
Its attention output becomes

    alpha * full attention + (1 - alpha) * streaming attention

where streaming attention sees only the first `sink` tokens and the `window` most
recent ones (`core.attention.streaming_keys`). The model's weights stay frozen;
only the gates train. The loss is the distance between the gated model's final
hidden states and the model's own (full attention) ones on the question-and-answer
part of synthetic passkey prompts, plus `l1` times the mean gate, which pulls
every gate towards streaming. A head the answers need resists that pull and ends
high; a head that streaming does not hurt ends at zero.

As in DuoAttention: gates start at 1 and are clamped to [0, 1] after each step,
Adam without weight decay, a learning rate ramped up over the first fifth of the
steps and down over the last fifth (never below a tenth), the passkeys teacher-
forced after their questions, and the loss the squared error of the final
(normalised) hidden states, averaged over the hidden size and the answer tokens.
Here the full and the streaming term are both computed from the gated model's
own queries and keys, in one pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from headscope.core.attention import additive_mask, query_absolute_positions, streaming_keys
from headscope.core.errors import InvalidParamsError
from headscope.core.models import ModelHandle

from .needles import load_haystack

#: passkey words (the NATO spelling alphabet), drawn at random
PASSKEY_WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliett kilo lima mike "
    "november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu"
).split()
ORDINALS = "first second third fourth fifth sixth seventh eighth ninth tenth".split()
INTRO = "Passkeys to a vault are hidden in the text below. Remember them.\n\n"
NEEDLE = "The {ordinal} passkey to the vault is: {passkey}."
QUESTION = (
    "\n\nQuestion: What is the {ordinal} passkey to the vault?\nAnswer: The {ordinal} passkey is"
)
ANSWER = " {passkey}."
#: needles are hidden between these fractions of the haystack (DuoAttention's range)
DEPTHS = (0.05, 0.95)
#: the name the gated attention function is registered under with transformers
ATTENTION_NAME = "headscope_duo_gates"


class DuoSettings(BaseModel):
    """How DuoAttention's gates are trained; the defaults finish in minutes on a CPU."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(40, ge=1, le=100_000, description="Optimisation steps.")
    length: int = Field(
        768, ge=1, description="Tokens of each synthetic passkey prompt (at most the model's)."
    )
    batch_size: int = Field(1, ge=1, le=64, description="Passkey prompts per step.")
    sink: int = Field(16, ge=0, description="Sink tokens a streaming head keeps during training.")
    window: int = Field(
        64,
        ge=1,
        description="Recent tokens a streaming head keeps during training (itself included); "
        "small against the prompt length, so that a head which retrieves pays for streaming.",
    )
    l1: float = Field(
        0.05, ge=0, description="Weight of the L1 penalty (mean gate) that pulls gates to 0."
    )
    lr: float = Field(
        0.1,
        gt=0,
        le=1,
        description="Peak learning rate of the gates (Adam); steps x lr should exceed 1 so "
        "that a gate can travel from full to streaming.",
    )
    passkeys: int = Field(
        3, ge=1, le=len(ORDINALS), description="Passkeys hidden in each prompt, asked in order."
    )
    passkey_words: int = Field(8, ge=1, le=64, description="Words of each passkey.")

    @model_validator(mode="after")
    def _window_inside_length(self):
        if self.sink + self.window >= self.length:
            raise ValueError(
                f"sink ({self.sink}) + window ({self.window}) must be smaller than length "
                f"({self.length}): otherwise a streaming head keeps every token"
            )
        return self


# -- synthetic passkey prompts ---------------------------------------------------------


@dataclass(frozen=True)
class PasskeyPrompt:
    """One prompt's tokens; from `answers_start` on come the questions and their
    teacher-forced answers, the positions the loss compares."""

    ids: list[int]
    answers_start: int
    passkeys: tuple[str, ...]


class PasskeyPrompts:
    """Draws passkey prompts of exactly `settings.length` tokens: haystack prose with
    `passkeys` needles at sentence ends between 5% and 95% of it, then one question
    per passkey, in order, each followed by its answer."""

    def __init__(self, tokenizer: Any, documents: list[str], settings: DuoSettings):
        self.tokenizer = tokenizer
        self.settings = settings
        self.separator = self._encode("\n\n")
        self.documents = [self._encode(text) for text in documents]
        ids = {token for document in self.documents for token in document}
        self.sentence_ends = {t for t in ids if self._ends_sentence(t)}

    def _encode(self, text: str, special: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _ends_sentence(self, token: int) -> bool:
        return self.tokenizer.decode([token]).rstrip().endswith((".", "!", "?"))

    def _pieces(self, passkeys: list[str]) -> tuple[list[int], list[list[int]], list[int]]:
        """The intro, one needle per passkey (with separators) and the answers block."""
        intro = self._encode(INTRO, special=True)
        needles, answers = [], []
        for ordinal, passkey in zip(ORDINALS, passkeys, strict=False):
            needle = self._encode(NEEDLE.format(ordinal=ordinal, passkey=passkey))
            needles.append(self.separator + needle + self.separator)
            answers += self._encode(QUESTION.format(ordinal=ordinal))
            answers += self._encode(ANSWER.format(passkey=passkey))
        return intro, needles, answers

    def frame_tokens(self) -> int:
        """The most tokens everything but the haystack can take (longest words)."""
        longest = max(PASSKEY_WORDS, key=lambda word: len(self._encode(" " + word)))
        passkey = " ".join([longest] * self.settings.passkey_words)
        intro, needles, answers = self._pieces([passkey] * self.settings.passkeys)
        return len(intro) + sum(map(len, needles)) + len(answers)

    def sample(self, rng: np.random.Generator) -> PasskeyPrompt:
        settings = self.settings
        passkeys = [
            " ".join(
                PASSKEY_WORDS[i]
                for i in rng.integers(0, len(PASSKEY_WORDS), settings.passkey_words)
            )
            for _ in range(settings.passkeys)
        ]
        intro, needles, answers = self._pieces(passkeys)
        budget = settings.length - len(intro) - sum(map(len, needles)) - len(answers)
        if budget < 1:
            raise self.no_room()
        haystack = self._haystack(rng, budget)
        depths = np.sort(rng.uniform(*DEPTHS, size=settings.passkeys))
        cuts = sorted(self._sentence_end_before(haystack, int(d * budget)) for d in depths)
        ids, start = list(intro), 0
        for cut, needle in zip(cuts, needles, strict=True):
            ids += haystack[start:cut] + needle
            start = cut
        ids += haystack[start:]
        answers_start = len(ids)
        return PasskeyPrompt(ids + answers, answers_start, tuple(passkeys))

    def _haystack(self, rng: np.random.Generator, budget: int) -> list[int]:
        """`budget` tokens of haystack, from a random document on, cycling."""
        index = int(rng.integers(len(self.documents)))
        ids: list[int] = []
        while len(ids) < budget:
            ids += self.documents[index % len(self.documents)] + self.separator
            index += 1
        return ids[:budget]

    def _sentence_end_before(self, haystack: list[int], target: int) -> int:
        """Position right after the last sentence-ending token before `target` (or, with
        none before it, the first one after it)."""
        before = range(target, 0, -1)
        after = range(target + 1, len(haystack) + 1)
        for position in [*before, *after]:
            if haystack[position - 1] in self.sentence_ends:
                return position
        return target

    def check_room(self) -> None:
        """Every prompt must have room for haystack text, whatever words are drawn."""
        if self.frame_tokens() >= self.settings.length:
            raise self.no_room()

    def no_room(self) -> InvalidParamsError:
        s = self.settings
        return InvalidParamsError(
            f"length {s.length} leaves no room for haystack text: {s.passkeys} passkeys of "
            f"{s.passkey_words} words, their questions and answers take up to "
            f"{self.frame_tokens()} tokens"
        )


# -- the gated attention ---------------------------------------------------------------


@dataclass(frozen=True)
class _GateSite:
    gates: torch.Tensor  # [n_layers, n_kv_heads]
    layer: int
    sink: int
    window: int


#: attention module (by id) -> its gates, while `gated_attention` is active
_SITES: dict[int, _GateSite] = {}


def _attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    softcap: float | None,
) -> torch.Tensor:
    """Softmax attention [b, H, q, d] with an additive mask; soft-capped logits (Gemma 2)
    have no fused kernel, so they go the eager way."""
    if softcap is None:
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True
        )
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    logits = torch.tanh(query @ key.transpose(-1, -2) * scaling / softcap) * softcap
    return torch.softmax(logits + mask, dim=-1) @ value


def _gated_attention_function(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [b, H, q, d], key and value
    [b, KV, k, d]; returns [b, q, H, d]. Float32 inside, the query's dtype out."""
    site = _SITES[id(module)]
    b, n_heads, q_len, head_dim = query.shape
    k_len = key.shape[2]
    scaling = head_dim**-0.5 if scaling is None else scaling
    q, k, v = query.float(), key.float(), value.float()
    full_mask = additive_mask(
        attention_mask, b, q_len, k_len, torch.float32, sliding_window, query.device
    ).to(query.device)
    keep = streaming_keys(
        query_absolute_positions(q_len, k_len, query.device),
        torch.arange(k_len, device=query.device),
        site.sink,
        site.window,
    )
    streaming_mask = full_mask.masked_fill(~keep, torch.finfo(torch.float32).min)
    full = _attend(q, k, v, full_mask, scaling, softcap)
    streaming = _attend(q, k, v, streaming_mask, scaling, softcap)
    group = n_heads // key.shape[1]
    gate = site.gates[site.layer].to(query.device).repeat_interleave(group).view(1, n_heads, 1, 1)
    mixed = streaming + gate * (full - streaming)
    return mixed.transpose(1, 2).contiguous().to(query.dtype), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION_NAME, _gated_attention_function)
    AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)


@contextlib.contextmanager
def gated_attention(
    model: torch.nn.Module, adapter: Any, gates: torch.Tensor, sink: int, window: int
) -> Iterator[None]:
    """Run `model` (the plain transformers module) with every layer's attention gated by
    `gates` [n_layers, n_kv_heads]: 1 is the model's own attention, 0 streaming.

    Only the attention implementation the model's configs name is switched, and it is
    switched back on leaving, also on error.
    """
    if tuple(gates.shape) != (adapter.n_layers, adapter.n_kv_heads):
        raise InvalidParamsError(
            f"gates of shape {tuple(gates.shape)} for a model of {adapter.n_layers} layers "
            f"and {adapter.n_kv_heads} KV heads"
        )
    _register()
    modules = [adapter.attn(model, layer) for layer in range(adapter.n_layers)]
    configs = {id(model.config): model.config}
    for module in modules:
        config = getattr(module, "config", None)
        if config is not None:
            configs.setdefault(id(config), config)
    before = [(config, config._attn_implementation) for config in configs.values()]
    try:
        for layer, module in enumerate(modules):
            _SITES[id(module)] = _GateSite(gates, layer, sink, window)
        for config, _ in before:
            config._attn_implementation = ATTENTION_NAME
        yield
    finally:
        for config, implementation in before:
            config._attn_implementation = implementation
        for module in modules:
            _SITES.pop(id(module), None)


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """No gradient for the model's weights; their flags come back on leaving."""
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


# -- training --------------------------------------------------------------------------


def check_settings(handle: ModelHandle, settings: DuoSettings) -> None:
    """Errors that need the model: a local model, prompts within its positions, and
    room for haystack text once the passkeys, questions and answers are in."""
    if handle.remote:
        raise InvalidParamsError(
            f"DuoAttention gates train on a local model; {handle.name} runs remotely"
        )
    handle.check_length(settings.length, "a DuoAttention passkey prompt")
    PasskeyPrompts(handle.tokenizer, [], settings).check_room()


def lr_factor(step: int, steps: int) -> float:
    """Learning-rate multiplier: a linear ramp up over the first fifth of the steps and
    down over the last fifth, never below 0.1 (DuoAttention's schedule)."""
    ramp = max(1, steps // 5)
    return min(1.0, max((step + 1) / ramp, 0.1), max((steps - step) / ramp, 0.1))


def final_hidden_states(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The base model's last hidden states (after the final norm) [b, seq, d_model]."""
    return model.base_model(input_ids=ids, use_cache=False).last_hidden_state


def distillation_loss(
    hidden: torch.Tensor, target: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Squared error averaged over the hidden size, then over the chosen positions."""
    error = (hidden.float() - target.float()).pow(2).mean(dim=-1)
    return error[positions].mean()


def train_gates(
    handle: ModelHandle,
    settings: DuoSettings,
    rng: np.random.Generator,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """DuoAttention's gates [n_layers, n_kv_heads], float32 in [0, 1] on the CPU: high
    means the head needs the full cache. The model is left as it was."""
    check_settings(handle, settings)
    model, adapter = handle.hf_model, handle.adapter
    prompts = PasskeyPrompts(handle.tokenizer, load_haystack(), settings)
    gates = torch.nn.Parameter(
        torch.ones(adapter.n_layers, adapter.n_kv_heads, device=handle.device)
    )
    optimiser = torch.optim.Adam([gates], lr=settings.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: lr_factor(step, settings.steps)
    )
    with handle.lock, frozen(model):
        for step in range(settings.steps):
            batch = [prompts.sample(rng) for _ in range(settings.batch_size)]
            ids = torch.tensor([p.ids for p in batch], device=handle.device)
            answers = torch.zeros(ids.shape, dtype=torch.bool, device=handle.device)
            for row, prompt in enumerate(batch):
                answers[row, prompt.answers_start :] = True
            with torch.no_grad():
                target = final_hidden_states(model, ids)
            with gated_attention(model, adapter, gates, settings.sink, settings.window):
                hidden = final_hidden_states(model, ids)
            loss = distillation_loss(hidden, target, answers) + settings.l1 * gates.mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            with torch.no_grad():
                gates.clamp_(0.0, 1.0)
            if progress is not None:
                progress(step + 1, settings.steps)
    return gates.detach().float().cpu().clone()
