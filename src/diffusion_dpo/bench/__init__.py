"""The benchmark behind `diffusion-dpo bench`: time training steps of our design against the official one.

Random-initialised models of real architectures (models/build.py) are saved once to a work folder with a
small synthetic Pick-a-Pic-style dataset and its prepared cache (runner.py); then each variant runs in its
own child process (child.py: clean peak-memory numbers), warms up, and times several steps:

  a  ours, LoRA         the trainer's own step (Trainer.micro_step -> train.step.preference_step, + backward + clip
                        + optimizer) on cached latents: no VAE, no text encoder, reference = the same UNet with
                        adapters off (steps.py)
  b  ours, full         the same with full fine-tuning and a frozen reference copy
  c  official design    as the official Diffusion-DPO code does per step: decode both JPEGs, resize/crop,
                        VAE-encode both images, run the text encoder, full fine-tuning with a full frozen copy
                        (official.py)
  e  ours, LoRA, cached  (a) with train.reference=cached: the reference errors of every pair computed once in
                        set-up (untimed), the step runs the policy only
  f  ours, LoRA, none    (a) with a reference-free loss (train.method=simpo, train.reference=none): no reference
  d  bare minimum       LoRA policy forward + backward and reference forward on precomputed tensors,
                        written as plainly as possible (the floor our step (a) is compared with; steps.py)
  p  prepare vs step    what `prepare` costs per pair (diffusion_dpo.cache.prepare, after a warm-up), next to what
                        the cache saves per pair and pass over the data: the trainer's data path (loader +
                        Trainer.batch_encoder) on the raw images minus the same on the cache (prepare_cost.py)

The flow-matching archs (sd35m, sd35l, flux: models.build.build_real_flow_pipeline) are the real transformers with
stand-in text encoders and VAE of the real output shapes, which only fill the cache; they run a, b, e, f (c, d and
p time UNet pipelines).

Measured (measure.py): pairs/s, seconds per step, peak memory (child RSS on CPU, max allocated on CUDA), FLOPs
per step (torch's FlopCounterMode), MFU on a GPU; runner.py adds the ratios a/c, a/d, a/b, e/a, e/c, f/a, f/c
and prepare's break-even passes. Every DPO logit here is losses.dpo_logit.
"""

VARIANTS = {
    "a": "ours: cached latents, LoRA",
    "b": "ours: cached latents, full + frozen copy",
    "c": "official: JPEG+VAE+text encoder per step, full + frozen copy",
    "d": "bare minimum: LoRA fwd+bwd + ref fwd",
    "e": "ours: cached latents, LoRA, cached reference errors",
    "f": "ours: cached latents, LoRA, no reference (simpo)",
    "p": "prepare once vs encode in every step",
}
"""Variant letter -> what it times (the label of its printed row)."""

__all__ = ["VARIANTS"]
