"""The reference-error store of train.reference=cached: the frozen reference's per-sample errors of every pair
of a latent cache, for the first E epochs of per-pair randomness; written and read here, computed by
train.reference_cache (which runs the training step's own reference forward).

Layout, beside the latent cache it belongs to (one keyed folder per set of inputs that decide the errors):

    <cache folder>/references/<key>/
        reference_manifest.json     key, key inputs, number of pairs
        epoch-00000.safetensors     errors float32 (N, 2): [i, 0] winner, [i, 1] loser of cache pair i under the
                                    noise, timestep, caption-dropout coin and latent noise of (seed, epoch 0, i)
        epoch-00001.safetensors     ... one file per epoch, so a larger train.reference_epochs reuses the others

Each file is written whole (temp file, fsync, rename) with the key in its metadata; a missing epoch is
computed, a file that cannot be read, has the wrong key or shape, or holds a non-finite value stops the run with
one line naming it and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from diffusion_dpo.cache.store import cache_key
from diffusion_dpo.errors import DataError
from diffusion_dpo.runtime import remove_temp_files, write_json_atomic, write_safetensors_atomic

REFERENCE_FORMAT = 1
REFERENCE_MANIFEST = "reference_manifest.json"


def epoch_name(epoch: int) -> str:
    return f"epoch-{epoch:05d}.safetensors"


def part_name(epoch: int, rank: int) -> str:
    """One process's rows of an epoch, merged into epoch_name(epoch) by the main process."""
    return f".epoch-{epoch:05d}.part-{rank:05d}.safetensors"


def reference_folder(cache_folder: str | Path, inputs: dict[str, Any]) -> Path:
    return Path(cache_folder) / "references" / cache_key(inputs)


def _broken(path: Path, problem: str) -> DataError:
    return DataError(f"reference store file {path} {problem}: delete it and rerun (train or `diffusion-dpo prepare` "
                     "with train.reference=cached computes it again)")


class ReferenceWriter:
    """Writes the files of the reference store whose key inputs are `inputs`."""

    def __init__(self, folder: Path, inputs: dict[str, Any], num_pairs: int):
        self.folder, self.inputs, self.num_pairs = Path(folder), inputs, num_pairs
        self.key = cache_key(inputs)

    def start(self) -> None:
        """The folder and its manifest (main process only); stale temp files of an interrupted run go."""
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_temp_files(self.folder)
        write_json_atomic(self.folder / REFERENCE_MANIFEST, {"format_version": REFERENCE_FORMAT, "key": self.key,
                                                             "key_inputs": self.inputs, "num_pairs": self.num_pairs})

    def write(self, name: str, errors: torch.Tensor, epoch: int, indices: Optional[torch.Tensor] = None) -> None:
        """errors (n, 2) float32 of `epoch`: of every pair, or of the pairs `indices` (a process's part)."""
        tensors = {"errors": errors.contiguous()}
        if indices is not None:
            tensors["indices"] = indices.to(torch.int64).contiguous()
        meta = {"key": self.key, "epoch": str(epoch), "num_pairs": str(self.num_pairs)}
        write_safetensors_atomic(self.folder / name, tensors, meta, sorted_header=True)


def read_part(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, errors) of a process's part, written moments ago by the same run."""
    from safetensors.torch import load_file

    t = load_file(str(path))
    return t["indices"], t["errors"]


def read_errors(path: Path, key: str, epoch: int, rows: int) -> torch.Tensor:
    """The (rows, 2) errors of one file, checked: readable, this store's key and epoch, shape, finite."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta, errors = f.metadata() or {}, f.get_tensor("errors")
    except Exception as err:  # truncated, overwritten, not a safetensors file
        raise _broken(path, f"cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None
    if meta.get("key") != key or meta.get("epoch") != str(epoch):
        raise _broken(path, f"belongs to another store (key {meta.get('key')!r}, epoch {meta.get('epoch')!r}; "
                            f"expected {key!r}, epoch {epoch})")
    if tuple(errors.shape) != (rows, 2) or errors.dtype != torch.float32:
        raise _broken(path, f"holds errors of shape {tuple(errors.shape)} {errors.dtype}, expected ({rows}, 2) "
                            "float32 (one row per cache pair)")
    if not torch.isfinite(errors).all():
        raise _broken(path, f"holds {int((~torch.isfinite(errors)).sum())} non-finite errors")
    return errors


class ReferenceStore:
    """The stored errors of epochs 0..E-1, in memory ((E, N, 2) float32: 8 bytes per pair and epoch)."""

    def __init__(self, folder: Path, key: str, epochs: int, num_pairs: int):
        self.folder = Path(folder)
        self.errors = torch.stack([read_errors(self.folder / epoch_name(e), key, e, num_pairs) for e in range(epochs)])

    @property
    def epochs(self) -> int:
        return self.errors.shape[0]

    def lookup(self, epochs: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference errors (B,) of winners and losers of the pairs `indices` drawn as `epochs` (int64 (B,))."""
        rows = self.errors[epochs, indices]  # (B, 2)
        # contiguous, as the live forward's: a strided mean sums in another order (last bit of err_ref_*)
        return rows[:, 0].contiguous(), rows[:, 1].contiguous()
