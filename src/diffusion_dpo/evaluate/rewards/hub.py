"""Where reward weights come from: a local file or folder, a hub id or an https URL, with one clear
ModelLoadError (naming the flag that passes a local copy) for every way loading can fail.

Offline mode is runtime.hub_offline() (HF_HUB_OFFLINE): nothing is downloaded, only local and cached
files load. Heavy libraries (huggingface_hub, safetensors) are imported inside the functions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from diffusion_dpo.errors import ModelLoadError
from diffusion_dpo.runtime import atomic_path, hub_offline, torch_dtype


def load_error(what: str, source: str, err: Exception, flag: str) -> ModelLoadError:
    """One line: what could not be loaded from where, the first line of the cause, and the flag to pass a local
    copy with."""
    hint = (" (offline: HF_HUB_OFFLINE is set and no cached copy was found)" if hub_offline() else "")
    return ModelLoadError(f"cannot load {what} from {source!r}{hint}: {type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}; pass a local copy with {flag}")


def from_pretrained(cls: Any, source: str, what: str, flag: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained` on a local folder or hub id, errors turned into one clear ModelLoadError."""
    local = Path(source).exists()
    if not local and source.startswith((".", "/", "~")):
        raise ModelLoadError(f"{what}: {source!r} does not exist; pass an existing folder with {flag}")
    try:
        return cls.from_pretrained(source, local_files_only=local or hub_offline(), **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise load_error(what, source, err, flag) from err


def fetch_file(source: str, default_filename: str, what: str, flag: str, suffixes: tuple[str, ...]) -> Path:
    """A weights file: a local file, a local folder holding `default_filename` (or a single file with one of
    `suffixes`), a hub id ("repo" or "repo/filename" with a matching suffix) or an https URL (cached)."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if (path / default_filename).is_file():
            return path / default_filename
        candidates = sorted(p for p in path.iterdir() if p.suffix in suffixes)
        if len(candidates) == 1:
            return candidates[0]
        raise ModelLoadError(f"{what}: folder {path} holds no {default_filename} (and not exactly one "
                             f"{'/'.join(suffixes)} file); pass the file itself with {flag}")
    if source.startswith(("http://", "https://")):
        return _download_url(source, what, flag)
    if source.startswith((".", "/", "~")):
        raise ModelLoadError(f"{what}: {source!r} does not exist; pass an existing file with {flag}")
    repo, filename = source, default_filename
    if source.endswith(suffixes) and source.count("/") >= 2:
        repo, filename = source.rsplit("/", 1)
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo, filename, local_files_only=hub_offline()))
    except Exception as err:  # hub errors: offline, missing repo/file, network
        raise load_error(what, f"{repo}/{filename}", err, flag) from err


def _download_url(url: str, what: str, flag: str) -> Path:
    """`url` downloaded once into the toolkit's cache (weights/<sha1 of the url>_<file name>)."""
    import hashlib
    import urllib.request

    from diffusion_dpo.evaluate.prompts import default_cache_dir

    target = default_cache_dir().parent / "weights" / (hashlib.sha1(url.encode()).hexdigest()[:12] + "_" +
                                                       url.rsplit("/", 1)[-1].replace("+", "_"))
    if target.exists():
        return target
    if hub_offline():
        raise ModelLoadError(f"cannot load {what} from {url}: offline and not cached at {target}; "
                             f"pass a local copy with {flag}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target, fsync=False) as tmp:  # an interrupted download never looks cached
            urllib.request.urlretrieve(url, tmp)  # noqa: S310 (fixed public URL)
    except Exception as err:
        raise load_error(what, url, err, flag) from err
    return target


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a torch pickle (.pt/.pth/.bin, read with weights_only=True).
    A checkpoint dict with a "state_dict" entry is unwrapped; a DataParallel "module." prefix is removed."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelLoadError(f"cannot read weights {path}: {type(err).__name__}: {err}") from err
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ModelLoadError(f"{path}: expected a state dict, found {type(sd).__name__}")
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def device_dtype(device: str | torch.device, dtype: torch.dtype | str) -> tuple[torch.device, torch.dtype]:
    """The scorers' `device` and `dtype` arguments as torch objects (dtype names as runtime.torch_dtype reads
    them)."""
    return torch.device(device), torch_dtype(dtype, "reward dtype")
