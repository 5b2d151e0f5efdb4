"""Implicit-reward accuracy (Diffusion-DPO, Table 2): a tuned model and its reference as a classifier.

For each held-out preference pair, the DPO logit (losses.dpo_logit, official form, errors are means over C,H,W)

    dpo_logit = -beta/2 * ((err_policy(w) - err_policy(l)) - (err_ref(w) - err_ref(l)))

with the errors of train.step.pair_errors (the trainer's own step), is averaged over a FIXED set of K
timesteps t_k = (k + 0.5) * T / K and one noise per (pair, k) drawn from `pair_generator(seed, k, pair_index)`;
the same noise and timestep serve winner and loser, policy and reference. The pair is classified correctly
when the averaged logit is > 0. Accuracy = the fraction of such pairs (results.json: mean_dpo_logit, and
mean_inside, its older name, kept). beta scales the logit but never changes its sign, so the accuracy does
not depend on beta.
Latents are the VAE posterior means (deterministic), times the VAE scaling factor; the VAE always runs in
float32, whatever `dtype` the UNets use. A non-finite logit stops the evaluation naming the pair: counted
as "wrong" it would silently lower the accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from diffusion_dpo.errors import ConfigError, ModelLoadError, NonFiniteLossError


def fixed_timesteps(num_train_timesteps: int, k: int) -> torch.Tensor:
    """K timesteps evenly spread over [0, T): (k + 0.5) * T / K, as int64."""
    return ((torch.arange(k, dtype=torch.float64) + 0.5) * num_train_timesteps / k).long()


def _load_policy(base_spec: Any, lora: str | None, unet: str | None, dtype: torch.dtype):
    """(policy unet, reference callable-holder). LoRA: one network, adapter off for the reference."""
    from diffusers import UNet2DConditionModel

    from diffusion_dpo.models.loading import freeze, load_unet
    from diffusion_dpo.models.reference import Reference

    if bool(lora) == bool(unet):
        raise ConfigError("implicit accuracy needs exactly one of a LoRA folder or a tuned UNet folder")
    if lora:
        policy = load_unet(base_spec, dtype)
        from diffusers.loaders import StableDiffusionLoraLoaderMixin

        from diffusion_dpo.models.lora import lora_source

        try:  # the diffusers LoRA format written by pipe.save_lora_weights / our save_lora
            # with the file's adapter config (save_lora records rank and alpha): else diffusers takes alpha = rank
            state, alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(lora_source(lora)[0],
                                                                                    return_lora_metadata=True)
            policy.load_lora_adapter(state, prefix="unet", network_alphas=alphas, metadata=metadata)
        except (OSError, ValueError, KeyError) as err:
            raise ModelLoadError(f"LoRA {lora}: cannot load: {err}") from err
        return freeze(policy), Reference(policy, lora=True)
    unet_dir = Path(unet)
    if (unet_dir / "unet" / "config.json").exists():
        unet_dir = unet_dir / "unet"
    if not (unet_dir / "config.json").exists():
        raise ModelLoadError(f"tuned UNet {unet}: no config.json there (nor in {unet}/unet)")
    policy = freeze(UNet2DConditionModel.from_pretrained(unet_dir, dtype=dtype))
    return policy, Reference(freeze(load_unet(base_spec, dtype)), lora=False)


def check_finite_logits(diff: torch.Tensor, pairs: Sequence[int], source: Any, timestep: int, dtype: str) -> None:
    """Raise NonFiniteLossError naming the first pair whose DPO logit `diff` (one per pair of `pairs`) is NaN
    or inf. `source[i]` is the pair's PairRecord (its key and prompt go into the message)."""
    bad = (~torch.isfinite(diff)).nonzero().flatten().tolist()
    if not bad:
        return
    i = pairs[bad[0]]
    record = source[i]
    hint = ("float16 overflowed in the UNet or text encoder: rerun with --dtype bfloat16 or float32"
            if dtype == "float16"
            else "look for NaN/inf in the tuned and base weights")
    raise NonFiniteLossError(f"implicit accuracy: pair {i} (key {record.key!r}, prompt {record.prompt[:80]!r}) has a "
                             f"non-finite DPO logit ({float(diff[bad[0]])}) at timestep {timestep}, "
                             f"{len(bad)} of {len(pairs)} pairs in its batch; {hint}")


@torch.no_grad()
def implicit_accuracy(base: str, pairs: str, lora: str | None = None, unet: str | None = None,
                      num_timesteps: int = 8, seed: int = 0, beta: float = 5000.0, resolution: int | None = None,
                      batch_size: int = 4, max_pairs: int | None = None, device: str = "cpu",
                      dtype: str = "float32", vae: str | None = None) -> dict[str, Any]:
    """Accuracy of the tuned model's implicit reward on the preference pairs at `pairs` (any source
    `diffusion_dpo.data.sources.open_source` reads: a manifest JSONL/CSV, folder pairs, Pick-a-Pic parquet).

    dtype: of the text encoders and UNets. vae: a separate VAE (hub id or folder), as `model.vae` in training;
    default the base's. Raises NonFiniteLossError naming the first pair whose logit is NaN or inf."""
    from diffusion_dpo.config import DataConfig
    from diffusion_dpo.data.dataset import PairDataset, collate_pairs
    from diffusion_dpo.data.sources import open_source
    from diffusion_dpo.data.transforms import PairTransform
    from diffusion_dpo.losses import dpo_logit
    from diffusion_dpo.models.diffusion import pair_generator
    from diffusion_dpo.models.encode import encode_images, scale_latents
    from diffusion_dpo.models.families import detect_spec, family_of
    from diffusion_dpo.runtime import torch_dtype as parse_dtype
    from diffusion_dpo.train.batch import PairBatch
    from diffusion_dpo.train.step import pair_errors

    if num_timesteps < 1:
        raise ConfigError(f"--implicit-timesteps must be >= 1, got {num_timesteps}")
    torch_dtype = parse_dtype(dtype, "--dtype")
    spec = detect_spec(base)
    family = family_of(spec)
    scheduler = family.load_noise_scheduler()
    # float32 whatever `dtype` is: SDXL's VAE overflows in float16 and its NaN latents would make every
    # logit of the pair NaN. Each image is encoded once, so this costs little next to the 4K UNet passes.
    autoencoder = family.load_vae(torch.float32, vae).to(device)
    encoder = family.prompt_encoder(torch_dtype, device)
    policy, reference = _load_policy(spec, lora, unet, torch_dtype)
    policy.to(device)
    reference.unet.to(device)
    res = resolution or policy.config.sample_size * spec.vae_downsample
    data_cfg = DataConfig(source=str(pairs), resolution=res, max_pairs=max_pairs, on_corrupt="error")
    source = open_source(data_cfg)
    # center crop, no flip; SDXL pairs get one geometry and one time-id row, as training's default
    transform = PairTransform.from_config(data_cfg, family.size_conditioned)
    dataset = PairDataset(source, transform, seed=seed, on_corrupt="error")
    timesteps = fixed_timesteps(spec.num_train_timesteps, num_timesteps)

    logits: list[torch.Tensor] = []  # per pair: the DPO logit averaged over the K draws
    for start in range(0, len(dataset), batch_size):
        idx = list(range(start, min(start + batch_size, len(dataset))))
        batch = collate_pairs([dataset[i] for i in idx])
        b = len(idx)
        pixels = batch["pixel_values"]  # (B, 2, 3, R, R): [:, 0] chosen, [:, 1] rejected
        mean_w, _ = encode_images(autoencoder, pixels[:, 0])
        mean_l, _ = encode_images(autoencoder, pixels[:, 1])
        lat_w, lat_l = scale_latents(mean_w, spec), scale_latents(mean_l, spec)
        cond = encoder(batch["prompts"])  # (B, ...): one text conditioning per pair
        pair_cond = family.pair_conditioning(batch, res, data_cfg.sdxl_time_ids)  # SDXL: (2B, 6), one row per pair
        pair_cond = None if pair_cond is None else pair_cond.to(device)
        total = torch.zeros(b)
        for k, t in enumerate(timesteps.tolist()):
            noise = torch.stack([torch.randn(lat_w.shape[1:], generator=pair_generator(seed, k, i)) for i in idx])
            t_b = torch.full((b,), t, dtype=torch.long)
            pairs_k = PairBatch(lat_w.cpu(), lat_l.cpu(), cond, noise, t_b, pair_cond)
            e = pair_errors(policy, reference, family, scheduler, pairs_k, "mean", device=device)
            step = dpo_logit(e.policy_w, e.policy_l, e.ref_w, e.ref_l, beta).float().cpu()  # (B,)
            check_finite_logits(step, idx, source, t, dtype)
            total += step
        logits.append(total / num_timesteps)
    logit = torch.cat(logits)  # (P,): the DPO logit averaged over the K timesteps
    return {"accuracy": float((logit > 0).float().mean()), "pairs": int(logit.numel()),
            "correct": int((logit > 0).sum()), "ties": int((logit == 0).sum()),
            "mean_dpo_logit": float(logit.mean()), "mean_inside": float(logit.mean()), "beta": beta,
            "num_timesteps": num_timesteps,
            "timesteps": timesteps.tolist(), "noise_seed": seed, "resolution": res,
            "latents": "VAE posterior mean x scaling factor", "error": "mean over C,H,W",
            "base": base, "lora": lora, "unet": unet, "vae": vae, "vae_dtype": "float32", "unet_dtype": dtype,
            "pairs_source": source.describe()}
