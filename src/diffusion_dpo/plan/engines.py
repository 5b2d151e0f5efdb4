"""Per-device memory of a simulated step under each training engine, whether it fits, and which to use.

plan.simulate gives one process's step without sharding: the weights (trainable, frozen, reference copy,
encoders) and, op by op, the live activations a(t), gradients g(t) and optimizer state o(t). An engine
changes which of these every device holds whole and which it holds 1/N of (N = world size), and adds its
own buffers; activations are never sharded (each device runs its own micro-batch). At every moment t of the
step the device holds

    whole weights + sharded weights / N + a(t) + grad share * g(t) + optimizer share * o(t) + buffers,

and the engine's estimate is the largest of these over the step. What each engine keeps (the assumptions):

| engine | weights | gradients | optimizer | buffers |
| --- | --- | --- | --- | --- |
| ddp | whole | whole | whole | DDP's gradient buckets: one more copy of the gradients (N > 1) |
| zero2 | whole | 1/N | 1/N | reduce buckets: min(gradients, 2 x 5e8 fp32 values) (DeepSpeed's default size) |
| zero2+offload | whole | CPU | CPU | the same buckets |
| fsdp (full shard) | 1/N, the reference too | 1/N | 1/N | the largest block gathered whole: 2x (current + prefetched) + its gradient |
| fsdp+offload | CPU (gathered block by block) | CPU | CPU | the same 3 blocks |
| zero3 | 1/N; the frozen reference whole (DeepSpeed wraps only the trained model) | 1/N | 1/N | the same 3 blocks |
| zero3+offload | CPU; the reference whole | CPU | CPU | the same 3 blocks |

The VAE and text encoders (when the step encodes on the fly) are whole on every device under every engine.
Everything is in the trainer's dtypes (fp32 trained weights, model.frozen_dtype / reference_dtype frozen ones,
autocast activations); DeepSpeed's own bf16 mode (bf16 weights + fp32 master copies in the optimizer
partition) is not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffusion_dpo.plan.simulate import StepProfile

GiB = 2**30
CONTEXT_BYTES = 1 * GiB
"""Per-process reserve for what no tensor count sees on a GPU: the CUDA context and kernels (0.5-1 GB), NCCL's
buffers."""
ALLOCATOR_MARGIN = 0.10
"""Headroom for the caching allocator's rounding and fragmentation (reserved over allocated, typically 5-15%):
an engine fits when estimate x 1.10 + CONTEXT_BYTES <= the device memory."""
DEEPSPEED_BUCKET_BYTES = 2 * 500_000_000 * 4
"""ZeRO-2's reduce buckets: two (overlap_comm) of reduce_bucket_size = 5e8 values, fp32."""


@dataclass(frozen=True)
class Engine:
    name: str
    config: str
    """The accelerate config that launches it (configs/accelerate/)."""
    grads: str
    """'whole', 'shard' (1/N) or 'cpu' (also the optimizer state's)."""
    weights: str
    """'whole', 'shard' or 'cpu'."""
    reference_sharded: bool
    buffers: str
    """'ddp_buckets', 'zero_buckets' or 'blocks' (3 of the largest block)."""


ENGINES = (  # in the order the planner prefers them among those that fit: fastest first
    Engine("ddp", "ddp.yaml", "whole", "whole", False, "ddp_buckets"),
    Engine("zero2", "zero2.yaml", "shard", "whole", False, "zero_buckets"),
    Engine("fsdp", "fsdp.yaml", "shard", "shard", True, "blocks"),
    Engine("zero3", "zero3.yaml", "shard", "shard", False, "blocks"),
    Engine("zero2+offload", "zero2.yaml + offload_optimizer_device: cpu", "cpu", "whole", False, "zero_buckets"),
    Engine("fsdp+offload", "fsdp.yaml + fsdp_offload_params: true", "cpu", "cpu", True, "blocks"),
    Engine("zero3+offload", "zero3.yaml + offload_param/offload_optimizer: cpu", "cpu", "cpu", False, "blocks"),
)


def engine_bytes(engine: Engine, profile: StepProfile, world_size: int) -> int:
    """Peak bytes per device of the simulated step under `engine` on `world_size` devices."""
    n = world_size
    w = profile.weights
    share = {"whole": 1.0, "shard": 1.0 / n, "cpu": 0.0}
    policy = w["policy_trainable"] + w["policy_frozen"]
    reference = w["reference"] * (share[engine.weights] if engine.reference_sharded else 1.0)
    fixed = policy * share[engine.weights] + reference + w["encoders"]
    trainable_grads = w["policy_trainable"]  # gradients have the trained weights' dtype (fp32)
    if engine.buffers == "ddp_buckets":
        fixed += trainable_grads if n > 1 else 0  # one process: accelerate wraps nothing in DDP
    elif engine.buffers == "zero_buckets":
        fixed += min(trainable_grads, DEEPSPEED_BUCKET_BYTES)
    else:
        fixed += 3 * profile.largest_unit
    g = o = share[engine.grads]
    return int(fixed + max(a + g * grad + o * opt for a, grad, opt in profile.timeline))


def fits(nbytes: int, device_bytes: int) -> bool:
    return nbytes * (1 + ALLOCATOR_MARGIN) + CONTEXT_BYTES <= device_bytes


def plan_engines(profile: StepProfile, world_size: int, device_bytes: int) -> list[dict]:
    """One row per engine: name, config, bytes per device, fits. Offload needs N>=1; sharding gains need N>1."""
    rows = []
    for engine in ENGINES:
        nbytes = engine_bytes(engine, profile, world_size)
        rows.append({"engine": engine.name, "config": engine.config, "bytes_per_device": nbytes,
                     "fits": fits(nbytes, device_bytes)})
    return rows


def recommend(rows: list[dict]) -> dict | None:
    """The first engine in ENGINES order that fits (plain DDP before sharding, sharding before offload), else None."""
    return next((r for r in rows if r["fits"]), None)
