"""LoRA on the trained network (a UNet, or the SD3 / Flux transformer; peft through diffusers' adapter API) and
LoRA export / loading.

The reference policy (adapters off, or a frozen copy) is models/reference.py.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)


def add_lora(unet, rank: int, alpha: Optional[float], dropout: float, target_modules: list[str],
             init_weights: str = "default") -> None:
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                        target_modules=list(target_modules), init_lora_weights=True if init_weights == "default" else "gaussian")
    unet.requires_grad_(False)
    unet.add_adapter(config)
    # LoRA parameters train in float32 even when the frozen base is in half precision
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def lora_state_dict(unet, state: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """The UNet's LoRA weights with peft's key names ('….to_q.lora_A.weight'; save_lora_weights adds 'unet.').
    state: the UNet's tensors when they are not its own (a sharded UNet's, consolidated: train.engine).

    Not passed through diffusers' convert_state_dict_to_diffusers: that renames only attention keys (to
    '….to_q.lora.down.weight') and leaves convolution keys in peft's names, and diffusers' loader picks one
    naming from the file's first key, so a file whose first key is a convolution's loses every attention
    adapter on load, without an error (tests/unit/models/test_lora_loading.py)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet, state_dict=state)


def save_lora(unet, output_dir: str | Path, family: Any, export_kohya: bool = False,
              state: Optional[dict[str, torch.Tensor]] = None) -> list[Path]:
    """Write pytorch_lora_weights.safetensors (loads with pipe.load_lora_weights(output_dir)) and,
    optionally, a kohya/A1111/ComfyUI-format copy (lora_unet_* keys with alpha). `family`: the
    models.families.ModelFamily whose pipeline class writes the file; `state`: as in lora_state_dict."""
    import diffusers

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    lora = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in lora_state_dict(unet, state).items()}
    pipe_cls = getattr(diffusers, family.pipeline_class)
    # the adapter's config (rank, alpha) goes into the file's metadata, as diffusers' own training scripts do:
    # without it diffusers loads alpha = rank, the wrong scale for any lora.alpha other than lora.rank
    # (the keyword follows the layers' one: unet_lora_adapter_metadata, transformer_lora_adapter_metadata)
    metadata_key = family.lora_layers_key.replace("_lora_layers", "_lora_adapter_metadata")
    adapter = {family.lora_layers_key: lora, metadata_key: unet.peft_config["default"].to_dict()}
    pipe_cls.save_lora_weights(output_dir, **adapter, safe_serialization=True)
    written = [output_dir / "pytorch_lora_weights.safetensors"]
    if export_kohya:
        written.append(save_kohya(unet, output_dir / "lora_kohya.safetensors", state))
    return written


def save_kohya(unet, path: Path, state: Optional[dict[str, torch.Tensor]] = None) -> Path:
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    peft_state = {f"unet.{k}": v for k, v in lora_state_dict(unet, state).items()}
    kohya = convert_state_dict_to_kohya(peft_state)
    # convert_state_dict_to_kohya derives alpha from the peft config's rank when none is stored: make it explicit
    config = unet.peft_config["default"]
    for key in [k for k in kohya if k.endswith(".lora_down.weight")]:
        kohya[key.replace(".lora_down.weight", ".alpha")] = torch.tensor(float(config.lora_alpha))
    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in kohya.items()}, str(path))
    return path


class _DropNoTextEncoderKeys:
    """logging filter: drop diffusers' "No LoRA keys associated to CLIPTextModel..." warning."""

    def filter(self, record) -> bool:
        return not record.getMessage().startswith("No LoRA keys associated to")


def lora_source(path: str | Path) -> tuple[str | dict[str, torch.Tensor], bool]:
    """What to hand diffusers' LoRA loaders for `path` (a folder with pytorch_lora_weights.safetensors, or a
    file), and whether the file holds UNet keys only.

    Files written before 2026-11-25 with convolution targets name attention keys in diffusers' style
    (lora.down/up) and the rest in peft's (lora_A/B); diffusers keeps one naming (the first key's) and drops
    the other without an error. Such a file is returned as a state dict with one naming."""
    from safetensors import safe_open

    path = Path(path)
    weights = path / "pytorch_lora_weights.safetensors" if path.is_dir() else path
    if not (weights.is_file() and weights.suffix == ".safetensors"):
        return str(path), False
    with safe_open(str(weights), framework="pt") as f:
        keys = list(f.keys())
    unet_only = not any(k.startswith(("text_encoder", "lora_te")) for k in keys)
    legacy = [k for k in keys if k.endswith((".lora.down.weight", ".lora.up.weight"))]
    if not (legacy and any(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)):
        return str(path), unet_only
    from safetensors.torch import load_file

    log.info("%s: renaming %d attention keys from lora.down/up to lora_A/B (the file mixes both namings)",
             weights, len(legacy))
    state = {k.replace(".lora.down.weight", ".lora_A.weight").replace(".lora.up.weight", ".lora_B.weight"): v
             for k, v in load_file(str(weights)).items()}
    return state, unet_only


def load_lora_into_pipeline(pipe, path: str | Path) -> None:
    """`pipe.load_lora_weights(path)`, through `lora_source` (files of the old mixed naming load completely).
    A LoRA of the UNet only (what `train` writes) makes diffusers warn that the text encoders got no keys,
    which is expected: that one warning is dropped when the file has no text-encoder keys, and kept otherwise."""
    source, unet_only = lora_source(path)
    logger = logging.getLogger("diffusers.loaders.lora_base")
    quiet = _DropNoTextEncoderKeys()
    if unet_only:
        logger.addFilter(quiet)
    try:
        pipe.load_lora_weights(source)
    finally:
        logger.removeFilter(quiet)


def grow_lora(unet, rank: int) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """Raise every LoRA adapter of `unet` to `rank` without changing the network's output (Curriculum-DPO++'s
    model-level curriculum; docs/curriculum.md has the derivation). Returns (old, new) of each replaced parameter.

    Per layer, with r the old rank: A' = [A; A_new] (rank x in), B' = [B, 0] (out x rank), so B' A' = B A + 0 A_new
    = B A. A_new is drawn as peft draws the A of a fresh rank-`rank` adapter (kaiming-uniform, which does not
    depend on the rank, or gaussian with std 1/rank). peft scales by alpha/r: the scale is kept as it is (alpha
    grows with r), so the output and the gradients of the old entries stay what they were. The modules are kept
    (only their weights replaced) so patches of their forward (models/lean_autograd.py) still apply."""
    import math

    from peft.tuners.lora import LoraLayer

    replaced = []
    for layer in (m for m in unet.modules() if isinstance(m, LoraLayer)):
        for name in list(layer.lora_A.keys()):
            r = layer.r[name]
            if rank == r:
                continue
            if rank < r:
                raise ValueError(f"grow_lora: rank {rank} is below the adapter's rank {r}")
            down, up = layer.lora_A[name], layer.lora_B[name]
            a, b = down.weight, up.weight  # (r, in, *kernel), (out, r, *1)
            new_a = torch.empty((rank, *a.shape[1:]), dtype=a.dtype, device=a.device)
            if unet.peft_config[name].init_lora_weights == "gaussian":
                torch.nn.init.normal_(new_a, std=1 / rank)
            else:
                torch.nn.init.kaiming_uniform_(new_a, a=math.sqrt(5))
            new_b = torch.zeros((b.shape[0], rank, *b.shape[2:]), dtype=b.dtype, device=b.device)
            with torch.no_grad():
                new_a[:r] = a
                new_b[:, :r] = b
            for module, old, new, attr in ((down, a, new_a, "out"), (up, b, new_b, "in")):
                module.weight = torch.nn.Parameter(new, requires_grad=old.requires_grad)
                setattr(module, f"{attr}_features" if isinstance(module, torch.nn.Linear) else f"{attr}_channels", rank)
                replaced.append((old, module.weight))
            # scaling[name] (= alpha/r, what forward multiplies by) stays exactly as it is; the bookkeeping follows
            layer.lora_alpha[name] = layer.lora_alpha[name] * rank / r
            layer.r[name] = rank
    for config in unet.peft_config.values():
        config.lora_alpha, config.r = config.lora_alpha * rank / config.r, rank
    return replaced
