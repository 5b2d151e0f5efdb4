"""Preference losses, chosen by name (train.method) from a closed table."""

from diffusion_dpo.losses.dpo import DPOLoss, LossOutput
from diffusion_dpo.losses.sft import SFTLoss

LOSSES = {"dpo": DPOLoss, "sft": SFTLoss}


def build_loss(method: str, beta: float):
    if method == "dpo":
        return DPOLoss(beta)
    if method == "sft":
        return SFTLoss()
    raise ValueError(f"unknown train.method {method!r}; choose one of {sorted(LOSSES)}")


__all__ = ["DPOLoss", "SFTLoss", "LossOutput", "LOSSES", "build_loss"]
