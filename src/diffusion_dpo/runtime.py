"""Process-level helpers every command shares: logging, offline detection, dtype names, atomic writes,
and which process of a launch this is.

One definition each, so "offline?", "which dtype is 'bf16'?" and "how is a file written safely?" have
one answer across the toolkit.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from diffusion_dpo.errors import ConfigError

# ----------------------------------------------------------------------------------------------
# Console logging


def setup_logging(level: int = logging.INFO) -> None:
    """Console logging for the long-running commands (one format everywhere)."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# ----------------------------------------------------------------------------------------------
# Offline detection (the same truthy values huggingface_hub accepts)

_TRUE = ("1", "ON", "YES", "TRUE")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set: no hub call may go out; only cached or local files load."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def datasets_offline() -> bool:
    """Either hub or datasets offline mode is set (datasets honours both)."""
    return hub_offline() or os.environ.get("HF_DATASETS_OFFLINE", "").upper() in _TRUE


# ----------------------------------------------------------------------------------------------
# dtype names

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}


def torch_dtype(name: str | torch.dtype, what: str = "dtype") -> torch.dtype:
    """'float32' | 'float16' | 'bfloat16' (or fp32 / fp16 / bf16, or a torch.dtype) -> torch.dtype."""
    if isinstance(name, torch.dtype):
        return name
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in DTYPES:
        raise ConfigError(f"{what} must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[key]


# ----------------------------------------------------------------------------------------------
# Atomic writes: a file either exists complete or not at all (temp file + fsync + rename)


def temp_path(path: Path) -> Path:
    """Where `path` is written before the rename: `.NAME.<pid>.tmp` beside it. Commands that clean up after a
    crash delete only temp files of their own output names (feedback.chunks.temp_pattern)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """`with atomic_path(p) as tmp: write(tmp)`: on success tmp is flushed to disk and renamed to p; on any
    error tmp is removed and p is untouched."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_temp_files(folder: str | os.PathLike) -> None:
    """Delete the temp files (`.NAME.<pid>.tmp`) an interrupted writer left in `folder`, a folder only this
    toolkit writes (commands writing into a user's folder delete only their own names: feedback.chunks)."""
    for stale in Path(folder).glob(".*.tmp"):
        stale.unlink()


def write_text_atomic(path: str | os.PathLike, text: str, fsync: bool = True) -> None:
    with atomic_path(path, fsync) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes_atomic(path: str | os.PathLike, data: bytes, fsync: bool = True) -> None:
    with atomic_path(path, fsync) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike, data: Any, indent: int | None = 1, fsync: bool = True) -> None:
    write_text_atomic(path, json.dumps(data, indent=indent, sort_keys=True), fsync)


def save_png_atomic(image: Any, path: str | os.PathLike, fsync: bool = False) -> None:
    with atomic_path(path, fsync) as tmp:
        image.save(tmp, format="PNG")


def write_safetensors_atomic(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                             metadata: dict[str, str] | None = None, fsync: bool = True,
                             sorted_header: bool = False) -> None:
    """sorted_header: byte-reproducible, the header JSON rewritten with sorted keys (safetensors writes its
    metadata map in a random order per call), so the same tensors and metadata give the same bytes."""
    from safetensors.torch import save, save_file

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if not sorted_header:
        with atomic_path(path, fsync) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return
    raw = save(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # data offsets are relative to the end of the header
    write_bytes_atomic(path, len(header).to_bytes(8, "little") + header + raw[8 + n:], fsync)


# ----------------------------------------------------------------------------------------------
# Which process of a launch this is


@dataclass
class ProcessInfo:
    """Process `rank` of `world_size` (one without a launcher), its device and a barrier. Work split by
    index k goes to the process with k % world_size == rank."""

    rank: int = 0
    world_size: int = 1
    device: Any = "cpu"
    barrier: Callable[[], None] = lambda: None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_accelerate(cls, state: Any) -> "ProcessInfo":
        """From an accelerate Accelerator or PartialState."""
        return cls(state.process_index, state.num_processes, state.device, state.wait_for_everyone)

    @classmethod
    def current(cls) -> "ProcessInfo":
        """This process, from accelerate's PartialState. Without CUDA, cpu=True lets `torchrun` /
        `accelerate launch` processes form a gloo group on the CPU."""
        from accelerate import PartialState

        return cls.from_accelerate(PartialState(cpu=not torch.cuda.is_available()))
