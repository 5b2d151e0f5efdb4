"""The reference policy of preference training (Wallace et al. 2024): always the starting weights.

- LoRA: the same network with the adapter switched off (`reference_mode`), no copy.
- Full fine-tuning: a frozen copy, in a chosen dtype, optionally parked on the CPU between uses.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, Iterator, Optional

import torch


@contextlib.contextmanager
def reference_mode(unet) -> Iterator[None]:
    """Inside the block the LoRA UNet computes the reference (starting) policy: adapters disabled."""
    trainable = [p for p in unet.parameters() if p.requires_grad]
    unet.disable_adapters()
    # peft also marks the adapters frozen; keep them trainable, as they are unused while disabled: FSDP2 takes its
    # mixed-precision dtypes from the parameters that require grad at the first forward, which is this one
    for p in trainable:
        p.requires_grad_(True)
    try:
        yield
    finally:
        unet.enable_adapters()


class Reference:
    """Computes the reference prediction for noisy inputs, without gradients."""

    def __init__(self, unet, lora: bool, dtype: Optional[torch.dtype] = None, offload: bool = False,
                 place: Optional[Callable[[torch.nn.Module], torch.nn.Module]] = None):
        """place: what to do with the frozen copy once made (FSDP2: shard it like the policy, train.engine)."""
        self.lora = lora
        self.offload = offload
        if lora:
            self.unet = unet  # the policy network itself, adapters off
        else:
            self.unet = copy.deepcopy(unet).requires_grad_(False).eval()
            if dtype is not None:
                self.unet.to(dtype)
            if offload:
                self.unet.to("cpu")
            if place is not None:
                self.unet = place(self.unet)

    @torch.no_grad()
    def __call__(self, call_unet, device) -> torch.Tensor:
        """`call_unet(unet)` runs one forward with the given network and returns the prediction."""
        if self.lora:
            with reference_mode(self.unet):
                return call_unet(self.unet)
        if self.offload:
            self.unet.to(device)
            try:
                return call_unet(self.unet)
            finally:
                self.unet.to("cpu")
        return call_unet(self.unet)
