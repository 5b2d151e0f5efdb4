"""(p): what `prepare` costs per pair, next to what the cache saves in each pass of the trainer."""

from __future__ import annotations

import time
from pathlib import Path


def prepare_cost(job: dict, device) -> dict:
    """`prepare`'s cost per pair, and the trainer's data path per pair on the raw images and on the cache."""
    import shutil

    from diffusion_dpo.bench.measure import device_name
    from diffusion_dpo.cache.prepare import PrepareTimes, default_batch_size, prepare_cache
    from diffusion_dpo.config import load_config
    from diffusion_dpo.runtime import ProcessInfo

    out = Path(job["out"])
    shutil.rmtree(out, ignore_errors=True)  # a fresh cache every round
    data = [f"model.pretrained={job['model']}", f"data.source={job['parquet']}", f"data.resolution={job['resolution']}"]
    process = ProcessInfo(device=device)
    batch = job.get("prepare_batch_size") or default_batch_size(device)
    # untimed warm-up on one batch: a process's first encoder calls pay one-off set-up (allocations, kernels)
    prepare_cache(load_config(None, [*data, f"data.max_pairs={batch}"]), cache_dir=str(out / "warmup"),
                  batch_size=batch, dist=process, progress=False)
    times = PrepareTimes()
    prepare_cache(load_config(None, data), cache_dir=str(out / "timed"), batch_size=batch, dist=process, progress=False,
                  times=times)
    return {"device": device.type, "device_name": device_name(device), "prepare_batch_size": batch,
            "prepare_s_per_pair": times.median_per_pair(), "prepare_parts": times.per_pair(),
            "instep_s_per_pair": data_path_s_per_pair(job, job["parquet"], out / "fly"),
            "cached_s_per_pair": data_path_s_per_pair(job, job["cache"], out / "cached"),
            "steps": job["steps"], "pairs": job["pairs"]}


def data_path_s_per_pair(job: dict, source: str, out: Path) -> float:
    """Median seconds per pair of what the trainer does before the UNet: the next batch from its loader
    (decoding + transforms, or reading the cache) and Trainer.batch_encoder (the VAE and text encoder on the fly)."""
    import gc

    import torch

    from diffusion_dpo.config import load_config
    from diffusion_dpo.train.trainer import Trainer

    cfg = load_config(None, [f"model.pretrained={job['model']}", f"data.source={source}",
                             f"data.resolution={job['resolution']}", f"train.batch_size={job['pairs']}",
                             "train.max_steps=100000", "train.checkpoint_every=0", f"train.seed={job['seed']}",
                             "output.report_to=none", f"output.dir={out}"])
    tr = Trainer(cfg).setup()
    batches = iter(tr.loader)
    times = []
    for i in range(job["warmup"] + job["steps"]):
        t0 = time.perf_counter()
        batch = tr.batch_encoder(next(batches))
        if batch.noise.is_cuda:
            torch.cuda.synchronize()
        if i >= job["warmup"]:
            times.append(time.perf_counter() - t0)
    del tr, batches
    gc.collect()
    return sorted(times)[len(times) // 2] / job["pairs"]
