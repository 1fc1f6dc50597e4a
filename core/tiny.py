"""Tiny randomly initialised models for tests: built from a config, never downloaded.

Each family headscope supports has a tiny twin with the same module layout, a
byte-level tokenizer (no vocabulary file needed) and a fixed seed, so tests of the
tracing primitives run in milliseconds and compare against plain PyTorch.
"""

from __future__ import annotations

from typing import Any

import torch

TINY_VOCAB_SPECIALS = ("<|endoftext|>", "<pad>")


def byte_tokenizer() -> Any:
    """A byte-level tokenizer with one token per byte plus two specials (258 ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(TINY_VOCAB_SPECIALS)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<pad>",
    )


def _common() -> dict[str, Any]:
    # A larger init range than the default gives peaked attention, so argmax
    # positions are well separated and tests do not hinge on near-ties.
    return {"vocab_size": 258, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}


def tiny_config(family: str) -> Any:
    """The config of the tiny model for `family` (see `TINY_FAMILIES`)."""
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    # Shared shape: 64 wide, 4 query heads over 2 KV heads, 512 positions; windows
    # of 8 tokens so test prompts reach past them.
    shape = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "initializer_range": 0.2,
        **_common(),
    }

    if family == "llama":
        return LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            initializer_range=0.2,
            tie_word_embeddings=False,
            **_common(),
        )
    if family == "qwen2":
        return Qwen2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            max_position_embeddings=512,
            initializer_range=0.2,
            use_sliding_window=False,
            **_common(),
        )
    if family == "gemma3":
        return Gemma3TextConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=512,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=16,
            initializer_range=0.2,
            **_common(),
        )
    if family == "mistral":
        return MistralConfig(num_hidden_layers=2, sliding_window=8, **shape)
    if family == "qwen3":
        return Qwen3Config(num_hidden_layers=2, head_dim=16, use_sliding_window=False, **shape)
    if family == "gemma2":
        return Gemma2Config(
            num_hidden_layers=3,
            head_dim=16,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=16,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=None,  # logits are read at lm_head, before any cap
            **shape,
        )
    if family == "phi3":
        return Phi3Config(num_hidden_layers=2, partial_rotary_factor=0.5, **shape)
    if family == "gpt2":
        return GPT2Config(
            n_embd=64,
            n_layer=3,
            n_head=4,
            n_positions=512,
            initializer_range=0.2,
            vocab_size=258,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=1,
        )
    raise ValueError(f"no tiny model for family {family!r}")


TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2")


def build_tiny_model(family: str, seed: int = 0, attn_implementation: str = "sdpa") -> Any:
    """A tiny causal LM for `family`, deterministic for a given seed."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family)
    if family == "gemma2" and attn_implementation == "sdpa":
        attn_implementation = "eager"  # soft-capped logits have no sdpa path in transformers
    config._attn_implementation = attn_implementation
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()
