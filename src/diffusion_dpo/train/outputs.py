"""Final outputs that stock tools load: a diffusers LoRA (optionally kohya format) or the network's folder
(unet/, or transformer/ for SD3 / Flux: family.network_folder), plus a model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from diffusion_dpo.config import RunConfig
from diffusion_dpo.models.families import ModelFamily
from diffusion_dpo.train.run_dir import describe_changes, forced_resumes


def write_final_outputs(out: Path, unet, cfg: RunConfig, family: ModelFamily, summary: dict,
                        state: Optional[dict[str, torch.Tensor]] = None) -> list[Path]:
    """state: the consolidated tensors of a sharded (FSDP2) UNet (train.sharded_state.consolidate); None: the UNet's own."""
    spec = family.spec
    written: list[Path] = []
    if cfg.train.finetune == "lora":
        from diffusion_dpo.models.lora import save_lora

        written += save_lora(unet, out, family, export_kohya=cfg.lora.export_kohya, state=state)
    else:
        if state is not None:
            from diffusion_dpo.train.sharded_state import unsharded_copy

            unet = unsharded_copy(unet, state)
        folder = family.network_folder  # what the pipeline's from_pretrained(..., unet=/transformer=) takes
        unet.save_pretrained(out / folder, safe_serialization=True)
        written.append(out / folder)
        if cfg.output.save_full_pipeline:
            from diffusers import DiffusionPipeline

            pipe = DiffusionPipeline.from_pretrained(spec.pretrained, revision=spec.revision, **{folder: unet})
            pipe.save_pretrained(out / "pipeline", safe_serialization=True)
            written.append(out / "pipeline")
    forced = forced_resumes(out)
    if forced:  # a run resumed with train.resume=force across changed settings says so wherever it is described
        summary = {**summary, "forced_resumes": forced}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    (out / "README.md").write_text(model_card(cfg, family, summary))
    written.append(out / "README.md")
    return written


def model_card(cfg: RunConfig, family: ModelFamily, summary: dict) -> str:
    t, spec = cfg.train, family.spec
    pipe = family.pipeline_class
    if t.finetune == "lora":
        usage = (f"pipe = {pipe}.from_pretrained(\"{spec.pretrained}\")\n"
                 f"pipe.load_lora_weights(\"{cfg.output.dir}\")")
        kind = f"LoRA (rank {cfg.lora.rank}, alpha {cfg.lora.alpha or cfg.lora.rank})"
    else:
        net, folder = family.network_class, family.network_folder
        usage = (f"{folder} = {net}.from_pretrained(\"{cfg.output.dir}/{folder}\")\n"
                 f"pipe = {pipe}.from_pretrained(\"{spec.pretrained}\", {folder}={folder})")
        kind = "full UNet fine-tune" if folder == "unet" else f"full {net} fine-tune"
    method = {"dpo": "Diffusion-DPO (Wallace et al., CVPR 2024)", "sft": "SFT on preferred images"}.get(
        t.method, f"the {t.method} preference loss (docs/losses.md)")
    lines = [
        "---", "library_name: diffusers", f"base_model: {spec.pretrained}", "tags:", "- diffusion-dpo",
        f"- {t.method}", "- text-to-image", "---", "",
        f"# {method}: {kind} of `{spec.pretrained}`", "",
        f"Trained with [diffusion-dpo](https://github.com/) for {summary.get('steps')} optimizer steps.", "",
        "| setting | value |", "| --- | --- |",
        f"| family | {spec.family} ({spec.prediction_type}) |",
        f"| method | {t.method} |",
        f"| beta | {t.beta} (error reduction: {t.error_reduction}; see docs/losses.md) |",
        f"| learning rate | {t.learning_rate} ({t.optimizer}, {t.lr_scheduler}, warm-up {cfg.warmup}) |",
        f"| pairs per optimizer step | {t.batch_size} x {t.gradient_accumulation} x processes |",
        f"| data | `{cfg.data.source}` at {cfg.data.resolution} px |",
        f"| final loss (mean of last 10 steps) | {summary.get('loss_last10', float('nan')):.4f} |",
    ]
    if t.finetune == "lora":  # the resolved list (an unset lora.target_modules is the family's set)
        lines.append(f"| LoRA target modules | {', '.join(f'`{m}`' for m in cfg.lora.target_modules)} |")
    if grown := summary.get("lora_rank_schedule"):  # train.curriculum.rank_schedule (Curriculum-DPO++)
        lines.append(f"| LoRA rank grown (Curriculum-DPO++) | ranks {grown['ranks']} from steps "
                     f"{grown['first_step_of_each_rank']}; the file holds the final rank |")
    if "implicit_acc_last10" in summary:
        lines.append(f"| implicit accuracy (last 10 steps) | {summary['implicit_acc_last10']:.3f} |")
    if summary.get("forced_resumes"):
        lines += ["", "## Settings changed during training", "",
                  "This run was resumed with `train.resume=force` across changed settings; the table above shows the "
                  "final values. Steps before each resume were trained with the earlier ones:", "",
                  "| resumed at step | setting: before -> after |", "| --- | --- |"]
        for f in summary["forced_resumes"]:
            lines.append(f"| {f['step']} | {describe_changes(f['changed'])} |")
    lines += ["", "## Use", "", "```python", f"from diffusers import {pipe}, {family.network_class}", usage, "```", "",
              "The resolved training config is in `config.yaml`; per-step metrics in `metrics.jsonl`.", ""]
    return "\n".join(lines)
