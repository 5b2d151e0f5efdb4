import importlib.util

import pytest
import torch

from diffusion_dpo.config import TrainConfig
from diffusion_dpo.errors import ConfigError
from diffusion_dpo.train.optim import build_lr_scheduler, build_optimizer
from diffusion_dpo.train.pair_order import PairOrder


def _params():
    return [torch.nn.Parameter(torch.randn(4, 4))]


def test_adamw_and_adafactor_step():
    for name in ("adamw", "adafactor"):
        params = _params()
        before = params[0].detach().clone()
        opt = build_optimizer(TrainConfig(optimizer=name), params, 1e-2)
        params[0].sum().backward()
        opt.step()
        assert not torch.equal(before, params[0].detach()), name


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes installed")
def test_adamw8bit_without_bitsandbytes_says_how_to_install():
    with pytest.raises(ConfigError, match=r"pip install 'diffusion-dpo\[bnb\]'"):
        build_optimizer(TrainConfig(optimizer="adamw8bit"), _params(), 1e-3)


def test_warmup_then_constant():
    opt = build_optimizer(TrainConfig(), _params(), 1.0)
    sched = build_lr_scheduler("constant_with_warmup", opt, 4, 10)
    lrs = []
    for _ in range(6):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0])


def test_sampler_shards_and_resumes_without_replay():
    single = PairOrder(10, batch_size=2, seed=3)
    r0 = PairOrder(10, batch_size=1, seed=3, rank=0, world_size=2)
    r1 = PairOrder(10, batch_size=1, seed=3, rank=1, world_size=2)
    it, i0, i1 = iter(single), iter(r0), iter(r1)
    first = [next(it) for _ in range(12)]  # crosses an epoch boundary (5 micro-batches per epoch)
    for batch in first:
        assert batch == next(i0) + next(i1)
    assert {e for b in first for e, _ in b} == {0, 1, 2}
    assert sorted(i for b in first[:5] for _, i in b) == list(range(10))  # epoch 0 covers every pair once
    resumed = iter(PairOrder(10, batch_size=2, seed=3, start_micro_batch=7))
    assert [next(resumed) for _ in range(5)] == first[7:12]
    with pytest.raises(ValueError, match="cannot fill one global micro-batch"):
        PairOrder(3, batch_size=2, seed=0, world_size=2)
