"""train.curriculum.rank_schedule end to end on the tiny SD model: the LoRA rank grows at the level boundary without
changing the network's output, training goes on, a run killed on either side of the switch resumes bit for bit,
and the final LoRA loads in stock diffusers at the final rank."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusion_dpo.cli import main
from diffusion_dpo.config import load_config
from diffusion_dpo.data.synthetic import write_manifest
from diffusion_dpo.train.trainer import Trainer, train

# M = 4 images per prompt, B = 2 levels: rank differences 2, 3 are level 1, 1 is level 2
RANK_DIFFERENCES = [3, 1, 2, 3, 1, 2, 3, 2]


@pytest.fixture(scope="module")
def ranked(tmp_path_factory):
    path = write_manifest(tmp_path_factory.mktemp("rank_growth"), n=8)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({**r, "rank_difference": d, "images_per_prompt": 4}) + "\n"
                            for r, d in zip(rows, RANK_DIFFERENCES)))
    return path


def _overrides(model, source, out) -> list[str]:
    # rank 2 for steps 1-2 (level 1), rank 4 from step 3 (level 2), at the scale alpha / rank = 8 / 4 = 2 throughout;
    # linear and convolution adapters; LoRA dropout (its global RNG must resume too); batch 1 x accumulation 2; a
    # checkpoint after every step
    return [f"model.pretrained={model}", f"data.source={source}", "data.resolution=32", "train.max_steps=5",
            "train.learning_rate=1e-3", "train.checkpoint_every=1", "train.batch_size=1", "train.gradient_accumulation=2",
            "lora.rank=4", "lora.alpha=8", "lora.dropout=0.1", "lora.target_modules=[to_q,to_v,conv1]",
            "output.report_to=none", f"output.dir={out}", "train.curriculum.enabled=true", "train.curriculum.levels=2",
            "train.curriculum.steps_per_level=2", "train.curriculum.rank_schedule=[2,4]"]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _lora(unet) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_" in n}


def test_rank_grows_at_the_boundary_with_the_same_output_and_resumes_exactly(tmp_path, tiny_sd, ranked, monkeypatch,
                                                                           train_until_checkpoint):
    switches = []
    original = Trainer.grow

    def observed(self, rank):
        """The UNet's output on a fixed input and its factors, right before and right after the grow."""
        unet = self.accelerator.unwrap_model(self.unet)
        g = torch.Generator().manual_seed(3)
        x = (torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500]),
             torch.randn(1, 3, unet.config.cross_attention_dim, generator=g))

        def output():
            unet.eval()  # no LoRA dropout, and no draw from the RNG the run's own dropout uses
            with torch.no_grad(), torch.random.fork_rng():
                out = unet(*x).sample
            unet.train()
            return out

        before, factors = output(), _lora(unet)
        original(self, rank)
        if self.lora_rank() != factors_rank(factors):
            switches.append((self.step, before, output(), factors, _lora(unet)))

    monkeypatch.setattr(Trainer, "grow", observed)
    straight = tmp_path / "straight"
    train(load_config(None, _overrides(tiny_sd, ranked, straight)), progress=False)
    monkeypatch.setattr(Trainer, "grow", original)

    assert len(switches) == 1
    step, before, after, old, new = switches[0]
    assert step == 2  # after 2 steps at rank 2, before step 3
    # the same function up to float32 rounding: each adapted layer bit-identical (convolutions) or within 1e-6 of its
    # output (linear layers: the GEMM for another rank groups the input sum differently; tests/unit/train/
    # test_curriculum_model.py); through the whole UNet that adds up to 1.4e-6 on outputs of size 1.2 here
    assert torch.allclose(after, before, rtol=0, atol=1e-5 * before.abs().max().item())
    assert any(t.abs().max() > 0 for n, t in old.items() if "lora_B" in n)
    for name, a in old.items():  # the leading block is the pre-switch factor, B's new columns are zero
        if "lora_A" in name:
            assert new[name].shape[0] == 4 and torch.equal(new[name][:2], a)
        else:
            assert new[name].shape[1] == 4 and torch.equal(new[name][:, :2], a) and not new[name][:, 2:].any()

    ra = _metrics(straight)
    assert [r["lora_rank"] for r in ra] == [2, 2, 4, 4, 4]
    assert [r["curriculum_level"] for r in ra] == [1, 1, 2, 2, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in ra)
    assert ra[-1]["trained_pairs"] == 10
    states = {s: json.loads((straight / "checkpoints" / f"checkpoint-{s}" / "trainer_state.json").read_text())
              for s in (3, 4, 5)}
    assert [states[s]["lora_rank"] for s in (3, 4, 5)] == [4, 4, 4]
    summary = json.loads((straight / "train_summary.json").read_text())
    assert summary["lora_rank_schedule"] == {"ranks": [2, 4], "first_step_of_each_rank": [1, 3]}
    assert "LoRA rank grown (Curriculum-DPO++) | ranks [2, 4] from steps [1, 3]" in (straight / "README.md").read_text()
    assert "LoRA rank grown to 4" in (straight / "train.log").read_text()

    # killed before the switch (checkpoint 2: rank 2; the resumed run grows) and after it (checkpoint 3: rank 4;
    # the resumed run rebuilds the grown adapter before loading the weights and optimizer state)
    weights = load_file(str(straight / "pytorch_lora_weights.safetensors"))
    keys = ("step", "loss", "grad_norm", "lr", "lora_rank", "curriculum_level", "trained_pairs")
    for kill in (2, 3):
        out = tmp_path / f"killed_at_{kill}"
        train_until_checkpoint(load_config(None, _overrides(tiny_sd, ranked, out)), step=kill)
        assert json.loads((out / "checkpoints" / f"checkpoint-{kill}" / "trainer_state.json").read_text())[
            "lora_rank"] == (2 if kill == 2 else 4)
        train(load_config(None, _overrides(tiny_sd, ranked, out)), progress=False)
        assert [[r[k] for k in keys] for r in _metrics(out)] == [[r[k] for k in keys] for r in ra], kill
        resumed = load_file(str(out / "pytorch_lora_weights.safetensors"))
        assert resumed.keys() == weights.keys() and all(torch.equal(resumed[k], weights[k]) for k in weights), kill

    # the final LoRA loads in stock diffusers, at the final rank, with the trained values
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.load_lora_weights(str(straight))
    (adapter,) = pipe.unet.peft_config
    assert pipe.unet.peft_config[adapter].r == 4 and pipe.unet.peft_config[adapter].lora_alpha == 8
    loaded = {n: p for n, p in pipe.unet.named_parameters() if "lora_" in n}
    assert len(loaded) == len(weights) == len(new)
    for key, value in weights.items():  # 'unet.<module>.lora_A.weight' -> '<module>.lora_A.<adapter>.weight'
        name = key.removeprefix("unet.").replace(".weight", f".{adapter}.weight")
        assert value.shape[0 if "lora_A" in key else 1] == 4 and torch.equal(loaded[name].detach(), value), key


def factors_rank(factors: dict[str, torch.Tensor]) -> int:
    return next(t.shape[0] for n, t in factors.items() if "lora_A" in n)


@pytest.mark.fault(input="resume with a changed `train.curriculum.rank_schedule`",
                   behaviour="exit 2: one line, it changes the shape of the trained weights")
def test_a_changed_rank_schedule_cannot_resume_and_a_moved_boundary_keeps_the_grown_rank(tmp_path, tiny_sd, ranked,
                                                                                          capsys):
    out = tmp_path / "run"
    args = [*_overrides(tiny_sd, ranked, out), "lora.dropout=0.0"]
    assert main(["train", *args, "train.max_steps=3"]) == 0  # step 3 trained at rank 4
    capsys.readouterr()
    assert main(["train", *args, "train.max_steps=4", "train.curriculum.rank_schedule=[3,4]", "train.resume=force"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.curriculum.rank_schedule" in err and "shape" in err
    # a forced resume that moves the level boundary (rank 2 would be due at step 4 now, rank 4 at step 5): the
    # adapter stays at 4
    assert main(["train", *args, "train.max_steps=5", "train.curriculum.steps_per_level=4", "train.resume=force"]) == 0
    assert [r["lora_rank"] for r in _metrics(out)] == [2, 2, 4, 4, 4]


@pytest.mark.fault(input="`train.curriculum.rank_schedule` under several processes",
                   behaviour="exit 2 at setup: one line, one process only")
def test_a_rank_schedule_is_refused_on_several_processes(tmp_path, tiny_sd, ranked, capsys, monkeypatch):
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))  # as under accelerate launch
    out = tmp_path / "run"
    assert main(["train", *_overrides(tiny_sd, ranked, out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "rank_schedule runs on one process without FSDP / DeepSpeed only" in err
    assert not (out / "train_run.json").exists()  # refused before the folder is claimed


@pytest.mark.fault(input="`train.curriculum.rank_schedule` under FSDP2 or DeepSpeed, even on one process",
                   behaviour="exit 2 at setup: one line, a plain process only")
def test_a_rank_schedule_is_refused_under_a_sharding_engine(tmp_path, tiny_sd, ranked, capsys, monkeypatch):
    from diffusion_dpo.train import engine

    monkeypatch.setattr(engine, "is_sharded", lambda acc: True)  # as a one-process DeepSpeed / FSDP2 launch
    out = tmp_path / "run"
    assert main(["train", *_overrides(tiny_sd, ranked, out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "without FSDP / DeepSpeed" in err
    assert not (out / "train_run.json").exists()
