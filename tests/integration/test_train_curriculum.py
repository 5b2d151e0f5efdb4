"""train.curriculum end to end on the tiny SD model: the pairs each step trains come from the active levels only,
and a run killed mid-level and resumed equals the uninterrupted run bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusion_dpo.config import load_config
from diffusion_dpo.data.synthetic import write_manifest
from diffusion_dpo.train.trainer import Trainer, train

# M = 4 images per prompt, B = 3 levels: level k = 4 - rank difference (d = 3 easiest)
RANK_DIFFERENCES = [3, 1, 2, 3, 1, 2, 3, 2]
LEVEL_1, LEVELS_1_2 = {0, 3, 6}, {0, 2, 3, 5, 6, 7}


@pytest.fixture(scope="module")
def ranked(tmp_path_factory):
    path = write_manifest(tmp_path_factory.mktemp("curriculum"), n=8)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({**r, "rank_difference": d, "images_per_prompt": 4}) + "\n"
                            for r, d in zip(rows, RANK_DIFFERENCES)))
    return path


def _overrides(model, source, out) -> list[str]:
    # batch 1 x accumulation 2 (the level boundary is in optimizer steps), LoRA dropout (the global RNG resumes)
    return [f"model.pretrained={model}", f"data.source={source}", "data.resolution=32", "data.caption_dropout=0.25",
            "train.max_steps=6", "train.learning_rate=1e-3", "train.checkpoint_every=3", "train.batch_size=1",
            "train.gradient_accumulation=2", "lora.rank=4", "lora.dropout=0.1", "output.report_to=none",
            f"output.dir={out}", "train.curriculum.enabled=true", "train.curriculum.levels=3",
            "train.curriculum.steps_per_level=2"]


def _cfg(model, source, out):
    return load_config(None, _overrides(model, source, out))


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_curriculum_trains_active_levels_only_and_resumes_mid_level_exactly(tmp_path, tiny_sd, ranked, monkeypatch,
                                                                          train_until_checkpoint):
    seen: list[list[int]] = []
    original = Trainer.micro_step

    def record(self, raw):
        seen.append(raw["indices"].tolist())
        return original(self, raw)

    monkeypatch.setattr(Trainer, "micro_step", record)
    straight = tmp_path / "straight"
    train(_cfg(tiny_sd, ranked, straight), progress=False)
    monkeypatch.setattr(Trainer, "micro_step", original)
    assert len(seen) == 12  # 6 steps x 2 micro-batches
    assert {i for b in seen[:4] for i in b} <= LEVEL_1  # steps 1-2: level 1
    assert {i for b in seen[4:8] for i in b} <= LEVELS_1_2  # steps 3-4: levels 1-2
    assert {i for b in seen[8:] for i in b} - LEVELS_1_2  # steps 5-6: level 3 has joined (with this seed one of the 4 pairs is a level-3 pair)
    ra = _metrics(straight)
    assert [r["curriculum_level"] for r in ra] == [1, 1, 2, 2, 3, 3]
    assert [r["curriculum_pairs"] for r in ra] == [3, 3, 6, 6, 8, 8]
    assert "curriculum: level 3 of 3 active" in (straight / "train.log").read_text()

    resumed = tmp_path / "resumed"
    train_until_checkpoint(_cfg(tiny_sd, ranked, resumed), step=3)  # killed in the middle of level 2
    train(_cfg(tiny_sd, ranked, resumed), progress=False)
    rb = _metrics(resumed)
    keys = ("step", "loss", "grad_norm", "lr", "curriculum_level", "curriculum_pairs")
    assert [[r[k] for k in keys] for r in rb] == [[r[k] for k in keys] for r in ra]
    wa, wb = (load_file(str(o / "pytorch_lora_weights.safetensors")) for o in (straight, resumed))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_two_processes_follow_the_curriculum_of_one(tmp_path, tiny_sd, ranked):
    """torchrun with 2 CPU processes (gloo DDP), batch 1 each == 1 process with batch 2, level by level."""
    import os
    import subprocess
    import sys

    extra = ["train.gradient_accumulation=1", "lora.dropout=0.0", "train.checkpoint_every=0"]
    single = tmp_path / "single"
    train(load_config(None, [*_overrides(tiny_sd, ranked, single), *extra, "train.batch_size=2"]), progress=False)
    multi = tmp_path / "multi"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
           "-m", "diffusion_dpo.cli", "train", *_overrides(tiny_sd, ranked, multi), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _metrics(single), _metrics(multi)
    assert [(r["curriculum_level"], r["curriculum_pairs"], r["pairs"]) for r in b] == \
        [(r["curriculum_level"], r["curriculum_pairs"], 2) for r in a]
    for ra, rb in zip(a, b):  # the same pairs per step: equal up to the reduction order (tolerances as elsewhere)
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-3)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-3)
