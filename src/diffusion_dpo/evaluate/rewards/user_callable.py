"""User rewards: a function (images, prompts) -> scores behind the reward protocol (`CallableReward`),
and the importer of the "module.path:function" specs that name one (`import_callable`)."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from diffusion_dpo.errors import UserError
from diffusion_dpo.evaluate.rewards.base import RewardModel

class CallableReward(RewardModel):
    """Wraps a function (images, prompts) -> scores (a sequence or tensor of N finite numbers)."""

    def __init__(self, fn: Callable[[list, list[str]], Any], name: str | None = None, batch_size: int = 16):
        self.fn = fn
        self.label = name or f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', type(fn).__name__)}"
        self.name = name or getattr(fn, "__name__", "callable")
        self.batch_size = batch_size
        self.info = {"metric": self.name, "model": self.label, "version": "user callable",
                     "scale": "as returned by the function", "preprocessing": "PIL RGB images as given"}

    def _score_batch(self, images, prompts):
        try:
            out = self.fn(images, prompts)
        except Exception as err:
            raise UserError(f"reward function {self.label} raised {type(err).__name__}: {err}") from err
        try:
            t = torch.as_tensor(out, dtype=torch.float32).detach().cpu()
        except (TypeError, ValueError, RuntimeError) as err:
            raise UserError(f"reward function {self.label} returned {type(out).__name__}, not numbers: {err}") from err
        if t.ndim == 2 and t.shape[1] == 1:
            t = t[:, 0]
        if t.shape != (len(images),):
            raise UserError(f"reward function {self.label} returned shape {tuple(t.shape)} for {len(images)} images; "
                            f"it must return one score per image, shape ({len(images)},)")
        if not torch.isfinite(t).all():
            raise UserError(f"reward function {self.label} returned non-finite scores (NaN or inf) for "
                            f"{int((~torch.isfinite(t)).sum())} of {len(images)} images")
        return t


def _import_user_module(name: str) -> Any:
    """importlib.import_module, then, if the top-level module is not found, once more with the current folder
    on sys.path: `python -m` puts it there but the `diffusion-dpo` console script does not, and the docs'
    `--reward my_rewards:fn` means ./my_rewards.py. Appended last, so it never shadows an installed module."""
    top = name.split(".")[0]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        cwd = os.getcwd()
        if err.name != top or cwd in sys.path or not (Path(top + ".py").is_file() or Path(top).is_dir()):
            raise
        sys.path.append(cwd)
        importlib.invalidate_caches()
        return importlib.import_module(name)


def import_callable(spec: str) -> Callable:
    """The callable a "module.path:function" spec names (function may be dotted: a class attribute).
    Every failure is one UserError line naming the spec."""
    module_name, _, attr = spec.partition(":")
    try:
        module = _import_user_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is None or not (module_name == err.name or module_name.startswith(err.name + ".")):
            raise UserError(f"reward {spec!r}: importing module {module_name!r} failed: {err}") from err
        raise UserError(f"reward {spec!r}: no module {err.name!r} on the Python path or in the current folder "
                        f"{os.getcwd()}; check the name, run from the folder that holds it, or add that folder "
                        f"to PYTHONPATH") from err
    except Exception as err:  # the user's module raised while importing (SyntaxError, a missing dependency...)
        first = str(err).splitlines()[0] if str(err) else ""
        raise UserError(f"reward {spec!r}: importing module {module_name!r} failed: {type(err).__name__}: "
                        f"{first}") from err
    fn = module
    for part in attr.split("."):
        if part not in vars(fn):
            raise UserError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
        fn = vars(fn)[part]
    if not callable(fn):
        raise UserError(f"reward {spec!r}: {attr!r} is not callable")
    return fn
