"""Implicit-reward accuracy (Diffusion-DPO, Table 2): a tuned model and its reference as a classifier.

For each held-out preference pair, the DPO logit (losses.dpo_logit, official form, errors are means over C,H,W)

    dpo_logit = -beta/2 * ((err_policy(w) - err_policy(l)) - (err_ref(w) - err_ref(l)))

with the errors of train.step.pair_errors (the trainer's own step: the family's noisy_and_target and predict, so
flow-matching families give velocity errors), is averaged over a FIXED set of K timesteps
(ModelFamily.evaluation_timesteps: t_k = (k + 0.5) * T / K for the UNet families; for SD3 / Flux sigma * 1000 at the
K quantiles of the family's sigma sampling, models.flow.stratified_timesteps) and one noise per (pair, k) drawn from
`pair_generator(seed, k, pair_index)`; the same noise and timestep serve winner and loser, policy and reference.
The tuned model is loaded as `sample` loads it (base + LoRA, or the tuned UNet / transformer folder). The pair is
classified correctly when the averaged logit is > 0. Accuracy = the fraction of such pairs (results.json: mean_dpo_logit, and
mean_inside, its older name, kept). beta scales the logit but never changes its sign, so the accuracy does
not depend on beta.
Latents are the VAE posterior means (deterministic), shifted and scaled as the pipelines do (scale_latents); the
VAE always runs in float32, whatever `dtype` the networks use. A non-finite logit stops the evaluation naming the
pair: counted as "wrong" it would silently lower the accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from diffusion_dpo.errors import ConfigError, NonFiniteLossError


def _load_policy(base: str, family: Any, lora: str | None, unet: str | None, dtype: str):
    """(policy network, Reference, the sampling pipeline's text encoders): the tuned model loaded exactly as `sample`
    loads it (evaluate.sampling.load_sampling_pipeline: base + LoRA, or the tuned UNet / transformer). LoRA: one
    network, adapter off for the reference; a tuned network: the base's, frozen, as the reference."""
    from diffusion_dpo.evaluate.sampling import SampledModel, load_sampling_pipeline
    from diffusion_dpo.models.loading import freeze
    from diffusion_dpo.models.reference import Reference
    from diffusion_dpo.runtime import torch_dtype

    if bool(lora) == bool(unet):
        raise ConfigError("implicit accuracy needs exactly one of a LoRA folder or a tuned network (UNet / transformer) "
                          "folder")
    pipe = load_sampling_pipeline(SampledModel("policy", base, lora=lora, unet=unet), "cpu", dtype)
    policy = freeze(getattr(pipe, family.network_folder))
    encoders = family.pipeline_text_encoders(pipe)
    if lora:
        return policy, Reference(policy, lora=True), encoders
    return policy, Reference(freeze(family.load_network(torch_dtype(dtype))), lora=False), encoders


def run_flow_settings(tuned: str) -> Any:
    """The `flow:` settings of the training run that wrote `tuned` (its output.dir, or the unet/ / transformer/ folder
    inside it: train writes config.yaml there), read as any config is (config.load_config); None when no run config
    is found (the defaults)."""
    from diffusion_dpo.config import load_config

    folder = Path(tuned)
    found = next((c for c in (folder / "config.yaml", folder.parent / "config.yaml") if c.is_file()), None)
    return None if found is None else load_config(found).flow


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
    from diffusion_dpo.models.encode import PromptEncoder, encode_images, scale_latents
    from diffusion_dpo.models.families import detect_spec, family_of
    from diffusion_dpo.runtime import torch_dtype as parse_dtype
    from diffusion_dpo.train.batch import PairBatch
    from diffusion_dpo.train.step import pair_errors

    if num_timesteps < 1:
        raise ConfigError(f"--implicit-timesteps must be >= 1, got {num_timesteps}")
    parse_dtype(dtype, "--dtype")
    spec = detect_spec(base)
    # flow families: the tuned run's own `flow` settings (sigma sampling, shifts, Flux guidance) when its folder holds
    # the run's config.yaml, else the defaults
    family = family_of(spec, flow=run_flow_settings(lora or unet))
    scheduler = family.load_noise_scheduler()
    # float32 whatever `dtype` is: SDXL's VAE overflows in float16 and its NaN latents would make every
    # logit of the pair NaN. Each image is encoded once, so this costs little next to the 4K UNet passes.
    autoencoder = family.load_vae(torch.float32, vae).to(device)
    policy, reference, text_encoders = _load_policy(base, family, lora, unet, dtype)
    encoder = PromptEncoder(family, text_encoders).to(device)
    policy.to(device)
    reference.unet.to(device)
    res = resolution or family.default_resolution(policy)
    data_cfg = DataConfig(source=str(pairs), resolution=res, max_pairs=max_pairs, on_corrupt="error")
    source = open_source(data_cfg)
    # center crop, no flip; SDXL pairs get one geometry and one time-id row, as training's default
    transform = PairTransform.from_config(data_cfg, family.size_conditioned)
    dataset = PairDataset(source, transform, seed=seed, on_corrupt="error")
    # UNet families: (k + 0.5) * T / K; flow families: sigma * N at the quantiles of their sigma sampling
    timesteps = family.evaluation_timesteps(num_timesteps, family.latent_shape(res))

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
            t_b = timesteps[k].repeat(b)  # int64 (UNet) or float32 (flow: sigma * N)
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
            "latents": "(VAE posterior mean - shift factor) x scaling factor", "error": "mean over C,H,W",
            "base": base, "lora": lora, "unet": unet, "vae": vae, "vae_dtype": "float32", "unet_dtype": dtype,
            "pairs_source": source.describe()}
