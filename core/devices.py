"""Where a model runs and in what precision: choosing, checking and measuring it.

`resolve_placement` turns what a user asked for (`--device`, `--dtype`,
`--device-map`, or the HEADSCOPE_DEVICE / HEADSCOPE_DTYPE defaults) into a concrete
`Placement`, or raises `DeviceUnavailableError` naming the problem, before any run
is stored or any weights are read. `auto` picks the accelerator and its natural
precision: CUDA in bfloat16 (float16 where the GPU lacks bfloat16), Apple MPS in
float16, the CPU in float32; with several CUDA GPUs `auto` shards the model over
them (`device_map="auto"`, accelerate). `fast` is the precision the device
multiplies fastest in hardware: as `auto` on accelerators, and bfloat16 on CPUs
with AMX (about 3x faster than float32 there; elsewhere bfloat16 is emulated).

`PeakMemory` measures what a run used, so the run can record it.
"""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass
from typing import Any

import torch

from .errors import InvalidParamsError

DEVICE_ENV = "HEADSCOPE_DEVICE"
DTYPE_ENV = "HEADSCOPE_DTYPE"

#: what --dtype accepts besides auto
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"
DTYPE_CHOICES = "auto, fast, " + ", ".join(DTYPES)
DEVICE_MAP_CHOICES = ("auto",)


class DeviceUnavailableError(InvalidParamsError):
    """A device or precision this machine (or its torch build) cannot provide."""


@dataclass(frozen=True)
class Placement:
    """A resolved device and precision for one model.

    `device` is where inputs go (the embedding's device); with `device_map="auto"`
    the layers are spread over every visible GPU and `device` is the first one.
    """

    device: str
    dtype: str
    device_map: str | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def key(self) -> tuple[str, str, str | None]:
        """What the service's model cache keys a handle by (with the model name)."""
        return (self.device, self.dtype, self.device_map)

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device, "dtype": self.dtype, "device_map": self.device_map}


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def available_devices() -> list[str]:
    """Every device this process could put a model on."""
    devices = ["cpu"] + [f"cuda:{i}" for i in range(_cuda_count())]
    return devices + (["mps"] if _mps_available() else [])


def _unavailable(device: str, why: str) -> DeviceUnavailableError:
    return DeviceUnavailableError(
        f"device {device!r} is not available: {why}; this machine offers "
        f"{', '.join(available_devices())}",
        [{"field": "device", "message": why}],
    )


def _check_device(text: str) -> str:
    """A concrete device name, or a clear error."""
    name = text.strip().lower()
    if name == "cpu":
        return "cpu"
    if name == "mps":
        if not _mps_available():
            raise _unavailable(text, "torch reports no Apple MPS backend")
        return "mps"
    if name == "cuda" or name.startswith("cuda:"):
        count = _cuda_count()
        if count == 0:
            built = "a CUDA build" if torch.version.cuda else "a CPU-only build"
            raise _unavailable(text, f"torch ({built}) sees no CUDA GPU")
        if name == "cuda":
            return f"cuda:{torch.cuda.current_device()}"
        index = name.removeprefix("cuda:")
        if not index.isdigit() or int(index) >= count:
            raise _unavailable(text, f"there are {count} CUDA GPUs (cuda:0..cuda:{count - 1})")
        return f"cuda:{int(index)}"
    raise DeviceUnavailableError(
        f"unknown device {text!r}: use one of {DEVICE_CHOICES}",
        [{"field": "device", "message": f"use one of {DEVICE_CHOICES}"}],
    )


def _natural_dtype(device: str) -> str:
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device == "mps":
        return "float16"
    return "float32"


def cpu_multiplies_bfloat16() -> bool:
    """Whether this CPU has bfloat16 matrix units (AMX), so bfloat16 runs faster
    than float32 instead of slower."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(check is not None and check())


def _fast_dtype(device: str) -> str:
    if device == "cpu":
        return "bfloat16" if cpu_multiplies_bfloat16() else "float32"
    return _natural_dtype(device)


def _check_dtype(text: str, device: str) -> str:
    name = text.strip().lower()
    if name == "auto":
        return _natural_dtype(device)
    if name == "fast":
        return _fast_dtype(device)
    if name not in DTYPES:
        raise DeviceUnavailableError(
            f"unknown dtype {text!r}: use one of {DTYPE_CHOICES}",
            [{"field": "dtype", "message": f"use one of {DTYPE_CHOICES}"}],
        )
    if name == "bfloat16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise DeviceUnavailableError(
            f"dtype bfloat16 is not supported on {device} (this GPU lacks it); use float16",
            [{"field": "dtype", "message": "bfloat16 unsupported on this GPU"}],
        )
    return name


def resolve_placement(
    device: str | None = None, dtype: str | None = None, device_map: str | None = None
) -> Placement:
    """The concrete placement for a request; None falls back to the environment
    defaults (HEADSCOPE_DEVICE, HEADSCOPE_DTYPE), then to auto."""
    requested = device or os.environ.get(DEVICE_ENV) or "auto"
    if device_map is not None and device_map not in DEVICE_MAP_CHOICES:
        raise DeviceUnavailableError(
            f"unknown device map {device_map!r}: use 'auto' (shard over the visible GPUs)",
            [{"field": "device_map", "message": "use 'auto'"}],
        )
    if requested.strip().lower() == "auto":
        gpus = _cuda_count()
        if gpus:
            resolved = "cuda:0"
            device_map = device_map or ("auto" if gpus > 1 else None)
        else:
            resolved = "mps" if _mps_available() else "cpu"
    else:
        resolved = _check_device(requested)
    if device_map == "auto" and not resolved.startswith("cuda"):
        device_map = None  # one device: nothing to shard over
    chosen_dtype = _check_dtype(dtype or os.environ.get(DTYPE_ENV) or "auto", resolved)
    return Placement(resolved, chosen_dtype, device_map)


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16; the inverse of DTYPES."""
    return str(dtype).removeprefix("torch.")


class PeakMemory:
    """The peak memory a block of work used on its devices, in bytes.

    On CUDA this is torch's peak allocation on each device the model uses, reset
    when the block starts; on the CPU it is the process's peak resident set, a
    high-water mark since the process started (the operating system cannot reset
    it); on MPS, the memory the driver holds when the block ends.
    """

    def __init__(self, devices: list[str]):
        self.devices = sorted(set(devices))
        self.bytes: int | None = None

    def __enter__(self) -> PeakMemory:
        for device in self.devices:
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats(device)
        return self

    def __exit__(self, *exc: object) -> None:
        self.bytes = self.measure()

    def measure(self) -> int:
        total = 0
        for device in self.devices:
            if device.startswith("cuda"):
                total += torch.cuda.max_memory_allocated(device)
            elif device == "mps":
                total += torch.mps.driver_allocated_memory()
            elif device == "cpu":
                total += process_peak_rss()
        return total


def process_peak_rss() -> int:
    """The process's peak resident set size in bytes (KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
