"""One variant in its own process (runner.run_child starts it): build the step, time it, print the result.

The result goes to stdout as one line `BENCH_RESULT {json}`; anything else the libraries print is ignored."""

from __future__ import annotations

import json

RESULT_PREFIX = "BENCH_RESULT "


def child_main(job_json: str) -> int:
    import torch

    from diffusion_dpo.bench.measure import rss_mb, time_step

    job = json.loads(job_json)
    base_rss = rss_mb("VmRSS")  # after importing torch, before any model
    torch.manual_seed(job["seed"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if job["variant"] == "p":
        from diffusion_dpo.bench.prepare_cost import prepare_cost

        result = prepare_cost(job, device)
    else:
        from diffusion_dpo.bench.official import official_step
        from diffusion_dpo.bench.steps import bare_step, our_step

        step = {"a": our_step, "b": our_step, "c": official_step, "d": bare_step, "e": our_step,
                "f": our_step}[job["variant"]](job, device)
        result = time_step(step, job, device, base_rss)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0
