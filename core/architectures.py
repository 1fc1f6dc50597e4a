"""Architecture adapters: one per model family, so analyses never use attribute paths.

An adapter answers the structural questions an analysis asks ("where is layer 7's
attention?", "which module's input holds the per-head outputs?", "how are rotary
embeddings applied?") for one family. Navigation works on plain torch modules and
on nnsight envoys alike, because envoys mirror their module's attributes.

Two sites inside each layer carry every head-level primitive:

- the **attention call**: the call of transformers' attention function inside the
  attention module's forward. Its inputs are (module, query, key, value, mask) with
  query/key after rotary embeddings, keys covering the whole cache. Attention rows,
  uniform masking and logit steering all act here.
- the **head-output site**: the input of the output projection, shaped
  [batch, seq, n_heads * head_dim]; head h is the slice h*hd:(h+1)*hd. Capture,
  ablation and patching act here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .errors import HeadscopeError


@dataclass(frozen=True)
class Projection:
    """A linear map and the slice of its output that belongs to q, k or v.

    Separate q/k/v projections use the whole output; GPT-2's fused `c_attn` uses a
    third of it.
    """

    module: Any
    out_slice: slice


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class ArchitectureAdapter:
    """Structural facts about one family of decoder-only transformers."""

    family: ClassVar[str] = ""
    model_types: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: Any):
        self.config = config

    # -- sizes -----------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def n_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def n_kv_heads(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.n_heads)

    @property
    def head_dim(self) -> int:
        head_dim = getattr(self.config, "head_dim", None)
        return int(head_dim or self.config.hidden_size // self.n_heads)

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without GQA)."""
        return self.n_heads // self.n_kv_heads

    def kv_head(self, head: int) -> int:
        """The key/value head that query head `head` reads (GQA grouping)."""
        return head // self.group_size

    @property
    def max_positions(self) -> int:
        return int(self.config.max_position_embeddings)

    # -- navigation ------------------------------------------------------------
    def layers(self, root: Any) -> Any:
        raise NotImplementedError

    def layer(self, root: Any, index: int) -> Any:
        return self.layers(root)[index]

    def attn(self, root: Any, index: int) -> Any:
        return self.layer(root, index).self_attn

    def q_proj(self, root: Any, index: int) -> Projection:
        return Projection(self.attn(root, index).q_proj, slice(None))

    def k_proj(self, root: Any, index: int) -> Projection:
        return Projection(self.attn(root, index).k_proj, slice(None))

    def v_proj(self, root: Any, index: int) -> Projection:
        return Projection(self.attn(root, index).v_proj, slice(None))

    def o_proj(self, root: Any, index: int) -> Any:
        """The output projection; its input holds the per-head outputs."""
        return self.attn(root, index).o_proj

    def embed_tokens(self, root: Any) -> Any:
        raise NotImplementedError

    def head_output_weights(self, root: Any, index: int) -> torch.Tensor:
        """The output projection split per head: [H, head_dim, d_model].

        Head h writes `z_h @ W[h]` to the residual stream (plus the projection's bias,
        which belongs to no head). `root` is the plain transformers model: weights
        are read, not traced. nn.Linear stores [d_model, H * head_dim].
        """
        weight = self.o_proj(root, index).weight.detach()
        return weight.T.reshape(self.n_heads, self.head_dim, -1)

    def lm_head(self, root: Any) -> Any:
        return root.lm_head

    def attention_call(self, root: Any, index: int) -> Any:
        """The nnsight source op of the attention-function call in layer `index`."""
        return find_attention_call(self.attn(root, index).source)

    # -- attention maths -------------------------------------------------------
    def scaling(self, index: int) -> float:
        return self.head_dim**-0.5

    def sliding_window(self, index: int) -> int | None:
        return None

    def rotary_cos_sin(
        self, root: Any, index: int, positions: torch.Tensor, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos/sin tables for `positions` [batch, seq] (None without rotary)."""
        return root.model.rotary_emb(like, positions)

    def apply_rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x [batch, heads, seq, head_dim] by the rotary tables; with partial
        rotary (Phi-3's partial_rotary_factor) only the first dims the tables cover."""
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        width = cos.shape[-1]
        rotated, passed = x[..., :width], x[..., width:]
        return torch.cat((rotated * cos + _rotate_half(rotated) * sin, passed), dim=-1)

    def normalise_queries(self, root: Any, index: int, q: torch.Tensor) -> torch.Tensor:
        """Per-head normalisation applied before rotary (Gemma 3's q_norm)."""
        return q

    def normalise_keys(self, root: Any, index: int, k: torch.Tensor) -> torch.Tensor:
        return k

    def queries_keys_from_projections(
        self,
        root: Any,
        index: int,
        q_out: torch.Tensor,
        k_out: torch.Tensor,
        positions: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rebuild the attention call's query/key from raw projection outputs.

        q_out/k_out are the (sliced) projection outputs [batch, seq, heads*hd];
        returns query [batch, H, seq, hd] and key [batch, KV, seq, hd] as the
        attention function receives them (normalised, rotated).
        """
        b, s, _ = q_out.shape
        q = q_out.view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = k_out.view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = self.normalise_queries(root, index, q)
        k = self.normalise_keys(root, index, k)
        tables = self.rotary_cos_sin(root, index, positions, q)
        if tables is not None:
            cos, sin = tables
            q, k = self.apply_rotary(q, cos, sin), self.apply_rotary(k, cos, sin)
        return q, k

    def describe(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "layers": self.n_layers,
            "query_heads": self.n_heads,
            "kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "max_positions": self.max_positions,
        }


class LlamaAdapter(ArchitectureAdapter):
    """Llama, Mistral, Qwen2, Qwen3 (q/k norms) and SmolLM:
    `model.layers[i].self_attn.{q,k,v,o}_proj`."""

    family = "llama"
    model_types = frozenset({"llama", "mistral", "qwen2", "qwen3"})
    #: families whose every layer attends within `config.sliding_window`
    every_layer_slides: ClassVar[frozenset[str]] = frozenset({"mistral", "phi3"})

    def layers(self, root: Any) -> Any:
        return root.model.layers

    def embed_tokens(self, root: Any) -> Any:
        return root.model.embed_tokens

    def sliding_window(self, index: int) -> int | None:
        window = getattr(self.config, "sliding_window", None)
        layer_types = getattr(self.config, "layer_types", None)
        if window and layer_types and layer_types[index] == "sliding_attention":
            return int(window)
        if window and getattr(self.config, "model_type", "") in self.every_layer_slides:
            return int(window)
        return None

    def normalise_queries(self, root: Any, index: int, q: torch.Tensor) -> torch.Tensor:
        norm = getattr(self.attn(root, index), "q_norm", None)
        return norm(q) if norm is not None else q

    def normalise_keys(self, root: Any, index: int, k: torch.Tensor) -> torch.Tensor:
        norm = getattr(self.attn(root, index), "k_norm", None)
        return norm(k) if norm is not None else k


class Phi3Adapter(LlamaAdapter):
    """Phi-3: one fused `qkv_proj` (queries, then keys, then values), partial rotary."""

    family = "phi3"
    model_types = frozenset({"phi3"})

    def _fused(self, root: Any, index: int, start: int, width: int) -> Projection:
        return Projection(self.attn(root, index).qkv_proj, slice(start, start + width))

    def q_proj(self, root, index):
        return self._fused(root, index, 0, self.n_heads * self.head_dim)

    def k_proj(self, root, index):
        kv_width = self.n_kv_heads * self.head_dim
        return self._fused(root, index, self.n_heads * self.head_dim, kv_width)

    def v_proj(self, root, index):
        kv_width = self.n_kv_heads * self.head_dim
        return self._fused(root, index, self.n_heads * self.head_dim + kv_width, kv_width)


class Gemma2Adapter(LlamaAdapter):
    """Gemma 2: query_pre_attn_scalar scaling, logit soft-capping (passed to the
    attention call), alternating sliding-window layers."""

    family = "gemma2"
    model_types = frozenset({"gemma2"})

    def scaling(self, index: int) -> float:
        return float(self.config.query_pre_attn_scalar) ** -0.5

    def sliding_window(self, index: int) -> int | None:
        if self.config.layer_types[index] == "sliding_attention":
            return int(self.config.sliding_window)
        return None


class Gemma3Adapter(Gemma2Adapter):
    """Gemma 3 text models: q/k norms, per-layer-type rotary tables, sliding windows."""

    family = "gemma3"
    model_types = frozenset({"gemma3_text"})

    def rotary_cos_sin(self, root, index, positions, like):
        return root.model.rotary_emb(like, positions, self.config.layer_types[index])


class GPT2Adapter(ArchitectureAdapter):
    """GPT-2: fused `c_attn` for q/k/v, `c_proj` output projection, learned positions."""

    family = "gpt2"
    model_types = frozenset({"gpt2"})

    def __init__(self, config: Any):
        super().__init__(config)
        if getattr(config, "reorder_and_upcast_attn", False):
            raise HeadscopeError(
                "GPT-2 models with reorder_and_upcast_attn=True bypass the attention "
                "function headscope instruments; load with reorder_and_upcast_attn=False"
            )

    @property
    def n_layers(self) -> int:
        return int(self.config.n_layer)

    @property
    def n_heads(self) -> int:
        return int(self.config.n_head)

    @property
    def n_kv_heads(self) -> int:
        return self.n_heads

    @property
    def head_dim(self) -> int:
        return int(self.config.n_embd) // self.n_heads

    @property
    def max_positions(self) -> int:
        return int(self.config.n_positions)

    def layers(self, root: Any) -> Any:
        return root.transformer.h

    def attn(self, root: Any, index: int) -> Any:
        return self.layer(root, index).attn

    def _fused(self, root: Any, index: int, part: int) -> Projection:
        width = self.n_heads * self.head_dim
        return Projection(self.attn(root, index).c_attn, slice(part * width, (part + 1) * width))

    def q_proj(self, root, index):
        return self._fused(root, index, 0)

    def k_proj(self, root, index):
        return self._fused(root, index, 1)

    def v_proj(self, root, index):
        return self._fused(root, index, 2)

    def o_proj(self, root, index):
        return self.attn(root, index).c_proj

    def head_output_weights(self, root, index):
        # Conv1D stores the transpose of nn.Linear: [H * head_dim, d_model].
        weight = self.o_proj(root, index).weight.detach()
        return weight.reshape(self.n_heads, self.head_dim, -1)

    def embed_tokens(self, root: Any) -> Any:
        return root.transformer.wte

    def scaling(self, index: int) -> float:
        scale = self.head_dim**-0.5 if self.config.scale_attn_weights else 1.0
        if self.config.scale_attn_by_inverse_layer_idx:
            scale /= float(index + 1)
        return scale

    def rotary_cos_sin(self, root, index, positions, like):
        return None


ADAPTERS: tuple[type[ArchitectureAdapter], ...] = (
    LlamaAdapter,
    Phi3Adapter,
    Gemma2Adapter,
    Gemma3Adapter,
    GPT2Adapter,
)


def adapter_for(config: Any) -> ArchitectureAdapter:
    """Pick the adapter for a transformers config, or explain what is supported."""
    model_type = getattr(config, "model_type", None)
    for adapter_cls in ADAPTERS:
        if model_type in adapter_cls.model_types:
            return adapter_cls(config)
    supported = sorted(t for a in ADAPTERS for t in a.model_types)
    raise HeadscopeError(
        f"no architecture adapter for model_type {model_type!r}; supported model types: "
        f"{', '.join(supported)} (families: Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3, "
        "Phi-3, GPT-2)"
    )


_CALL_NAME = re.compile(r"^attention_interface_(\d+)$")


def find_attention_call(source: Any) -> Any:
    """Locate the attention-function call among a module's source operations.

    transformers assigns `attention_interface = ...get_interface(...)` and then
    calls it; nnsight names both `attention_interface_<n>`, and the numbering has
    changed between versions. The call is the op whose source line calls it.
    """
    compiled = source.compiled
    lines = compiled.source.split("\n")
    candidates = [name for name in compiled.names if _CALL_NAME.match(name)]
    for name in candidates:
        line = lines[compiled.lines[name] - 1] if compiled.lines[name] - 1 < len(lines) else ""
        if "attention_interface(" in line:
            return getattr(source, name)
    if candidates:
        return getattr(source, candidates[-1])
    raise HeadscopeError(
        "could not find the attention-function call in the attention module's forward; "
        "this transformers version may not route attention through ALL_ATTENTION_FUNCTIONS"
    )
