"""The measured peak that checks the planner: real training steps of the config on this machine's CPU.

A child process sets the trainer up (Trainer.setup: the real networks, data, optimizer), then counts what is
live before the first step, and runs `steps` training steps (Trainer.micro_step, backward,
train.optim.apply_gradients: the trainer's own loop body) under torch.profiler with profile_memory=True:

    measured peak = live tensor bytes before the steps (every torch.Tensor the garbage collector can reach,
                    each storage once) + the highest running total of the CPU allocator's allocations minus
                    frees during the steps (the profiler's [memory] events, in time order)

What it counts: every allocation through PyTorch's CPU allocator, including an op's scratch tensors (which the
planner's op-level count does not see). What it does not: memory oneDNN / MKL allocate outside PyTorch's
allocator, Python objects, and glibc's heap fragmentation, which is why it is not the process's RSS (on this
CPU RSS runs 0.5-1 GB above live tensors: docs/performance.md, "Memory"); nor a GPU's CUDA context. When
the trainer runs on a GPU the child reads torch.cuda.memory_allocated() before the steps and
max_memory_allocated() over them instead (written for a lent GPU; not yet run on one).
"""

from __future__ import annotations

import json
import subprocess
import sys

RESULT_PREFIX = "PLAN_MEASURED "


def measure_peak(cfg, steps: int = 3) -> dict:
    """Measured peak bytes of `steps` training steps of `cfg` (a RunConfig), in a fresh child process:
    {"peak": bytes, "before_steps": bytes, "steps": steps}."""
    import tempfile
    from pathlib import Path

    import yaml

    from diffusion_dpo.config import to_dict

    with tempfile.TemporaryDirectory(prefix="dpo-plan-measure-") as tmp:
        config = Path(tmp, "config.yaml")
        config.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        job = {"config": str(config), "out": str(Path(tmp, "run")), "steps": steps}
        proc = _run_child(job)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:  # e.g. data.source missing: the child's last line names the error
        from diffusion_dpo.errors import ConfigError

        last = next((x for x in reversed((proc.stderr or proc.stdout).splitlines()) if x.strip()), "no output")
        raise ConfigError(f"plan --measure: the training steps failed (exit {proc.returncode}): {last.strip()}; "
                          "fix the config so that `diffusion-dpo train` runs it, or drop --measure")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def _run_child(job: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from diffusion_dpo.plan.measure import child_main; "
                           "sys.exit(child_main(sys.argv[1]))", json.dumps(job)], capture_output=True, text=True)


def live_tensor_bytes() -> int:
    """Bytes of every CPU tensor storage reachable through the garbage collector, each storage once."""
    import gc

    import torch

    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
            st = obj.untyped_storage()
            if st.nbytes():
                seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def child_main(job_json: str) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from diffusion_dpo.config import load_config
    from diffusion_dpo.train.optim import apply_gradients
    from diffusion_dpo.train.trainer import Trainer

    job = json.loads(job_json)
    cfg = load_config(job["config"], [f"output.dir={job['out']}", "output.report_to=none", "train.checkpoint_every=0",
                                      "train.resume=never", "train.max_steps=100000"])
    tr = Trainer(cfg, progress=False).setup()
    acc, batches = tr.accelerator, iter(tr.loader)

    def steps() -> None:  # Trainer._train's loop body, one micro-batch per optimizer step
        for _ in range(job["steps"]):
            loss, metrics, _ = tr.micro_step(next(batches))
            acc.backward(loss)
            metrics = {k: float(v) for k, v in metrics.items()}
            apply_gradients(acc, tr.optimizer, tr.lr_scheduler, tr.params, cfg.train.max_grad_norm, metrics)
            del loss

    if tr.device.type == "cuda":  # the caching allocator keeps the count itself (not run here: no GPU lent yet)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        steps()
        high = torch.cuda.max_memory_allocated() - before
    else:
        before = live_tensor_bytes()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            steps()
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
        running = high = 0
        for _, nbytes in events:  # allocations positive, frees negative
            running += nbytes
            high = max(high, running)
    print(RESULT_PREFIX + json.dumps({"peak": before + high, "before_steps": before, "steps": job["steps"]}), flush=True)
    return 0
