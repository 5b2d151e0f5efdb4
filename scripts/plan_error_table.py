"""The planner's estimate against measured peaks of real training steps on this CPU: the error table of
docs/scaling.md ("Planning memory").

    python scripts/plan_error_table.py [--work DIR] [--archs tiny,mid]

For each arch (random-initialised pipelines of models.build, saved once to --work) and each setting below it runs
`diffusion_dpo.plan.make_plan` (two steps simulated on fake tensors) and `plan.measure.measure_peak` (three real
steps in a child process, the CPU allocator counted by torch.profiler), as `diffusion-dpo plan --measure` does,
and prints one markdown row per run."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

SETTINGS = [  # (finetune, pairs per step, gradient checkpointing, data)
    ("lora", 1, False, "images"), ("full", 1, False, "images"),
    ("lora", 2, False, "images"), ("full", 2, False, "images"),
    ("lora", 2, True, "images"), ("full", 2, True, "images"),
    ("lora", 2, False, "cache"), ("full", 2, False, "cache"),
]
RESOLUTION = {"tiny": 32, "mid": 256}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="plan-error-work", help="folder for the pipelines, data and caches")
    parser.add_argument("--archs", default="tiny,mid")
    args = parser.parse_args()

    from diffusion_dpo.bench.runner import WORDS
    from diffusion_dpo.config import load_config
    from diffusion_dpo.data.synthetic import write_pickapic_parquet
    from diffusion_dpo.models.build import build_pipeline
    from diffusion_dpo.plan import make_plan
    from diffusion_dpo.plan.measure import measure_peak

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print("| arch | fine-tuning | pairs/step | gradient checkpointing | images | estimate (MiB) | measured (MiB) | "
          "estimate / measured |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for arch in args.archs.split(","):
        res = RESOLUTION[arch]
        model = work / f"model-{arch}"
        if not (model / "model_index.json").is_file():
            build_pipeline("sd", arch, resolution=res, words=WORDS).save_pretrained(model, safe_serialization=True)
        pairs = work / f"pairs-{res}.parquet"
        if not pairs.is_file():
            write_pickapic_parquet(pairs, n=16, seed=0, size=(res * 9 // 8, res * 5 // 4))
        for finetune, batch, checkpointing, data in SETTINGS:
            cache = [f"data.cache_dir={work / f'cache-{arch}'}"] if data == "cache" else []
            cfg = load_config(None, [f"model.pretrained={model}", f"data.source={pairs}", f"data.resolution={res}",
                                     f"train.finetune={finetune}", f"train.batch_size={batch}",
                                     f"train.gradient_checkpointing={str(checkpointing).lower()}",
                                     f"output.dir={work / 'run'}", "output.report_to=none", *cache])
            if cache:  # prepare the cache first, so that neither count includes encoding the dataset
                from diffusion_dpo.cache.prepare import prepare_cache

                with contextlib.redirect_stdout(sys.stderr):  # its summary line is not a table row
                    prepare_cache(cfg, progress=False)
            estimate = make_plan(cfg, 1, 2**40)["single_device"]["peak"]
            measured = measure_peak(cfg)["peak"]
            print(f"| {arch} | {finetune} | {batch} | {'on' if checkpointing else 'off'} | "
                  f"{'cache' if cache else 'encoded in the step'} | {estimate / 2**20:.1f} | {measured / 2**20:.1f} | "
                  f"{estimate / measured:.3f} |", flush=True)


if __name__ == "__main__":
    main()
