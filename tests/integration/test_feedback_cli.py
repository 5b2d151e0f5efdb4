"""End to end: `label` then `train` on its output, `generate-pairs`, a two-round `iterate` on tiny models,
and the shipped AI-feedback config."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from diffusion_dpo.cli import main
from diffusion_dpo.config import load_config
from diffusion_dpo.data.synthetic import write_pickapic_parquet

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parents[1] / "unit" / "feedback"))  # feedback_test_rewards
BRIGHT = "feedback_test_rewards:brightness"
REPO = Path(__file__).parents[2]
TRAIN = ["data.resolution=32", "train.max_steps=2", "train.batch_size=2", "train.checkpoint_every=1",
         "train.learning_rate=1e-2", "lora.rank=4", "output.report_to=none"]


def test_label_then_train_on_its_output(tiny_sd, tmp_path, capsys):
    parquet = write_pickapic_parquet(tmp_path / "pp.parquet", n=6, ties=2)
    assert main(["label", "--data", str(parquet), "--reward", BRIGHT, "--out", str(tmp_path / "lab"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "6 pairs judged -> 6 kept, 0 dropped as ties" in out and "agreement with the original labels: 100.0%" in out
    assert main(["train", f"model.pretrained={tiny_sd}", f"data.source={tmp_path / 'lab' / 'pairs.jsonl'}",
                 f"output.dir={tmp_path / 'run'}", *TRAIN]) == 0
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()


def test_bad_user_reward_is_one_clear_line(tmp_path, capsys):
    parquet = write_pickapic_parquet(tmp_path / "pp.parquet", n=2)
    code = main(["label", "--data", str(parquet), "--reward", "feedback_test_rewards:returns_nan",
                 "--out", str(tmp_path / "lab"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "error: reward function feedback_test_rewards:returns_nan returned non-finite" in err


def test_generate_pairs_cli(tiny_sd, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    assert main(["generate-pairs", "--base", str(tiny_sd), "--prompts", str(prompts), "-k", "3", "--steps", "2",
                 "--resolution", "32", "--reward", BRIGHT, "--out", str(tmp_path / "gen"), "--no-progress"]) == 0
    assert "2 prompts, 6 images -> 2 pairs" in capsys.readouterr().out
    rows = [json.loads(x) for x in (tmp_path / "gen" / "pairs.jsonl").read_text().splitlines()]
    assert all(r["score_chosen"] > r["score_rejected"] and (tmp_path / "gen" / r["chosen"]).is_file() for r in rows)


def test_two_rounds_round_two_reference_is_round_one_result(tiny_sd, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green cat\n")
    out = tmp_path / "it"
    argv = ["iterate", "--rounds", "2", "--out", str(out), "--prompts", str(prompts), "-k", "2", "--steps", "2",
            "--reward", BRIGHT, "--no-progress", f"model.pretrained={tiny_sd}", *TRAIN]
    assert main(argv) == 0
    r1, r2 = out / "round-001", out / "round-002"
    assert load_config(r1 / "config.yaml").model.pretrained == str(tiny_sd)
    assert load_config(r2 / "config.yaml").model.pretrained == str(r1 / "model")
    assert json.loads((r2 / "round.json").read_text())["reference"] == str(r1 / "model")
    assert (r2 / "model" / "model_index.json").is_file() and (r2 / "train" / "pytorch_lora_weights.safetensors").is_file()

    # round 1's fused UNet == base UNet + up @ down of round 1's LoRA (alpha = rank: scale 1), and != base
    base = load_file(tiny_sd / "unet" / "diffusion_pytorch_model.safetensors")
    fused = load_file(r1 / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    lora = load_file(r1 / "train" / "pytorch_lora_weights.safetensors")
    assert set(fused) == set(base)
    targets = {k.removeprefix("unet.").removesuffix(".lora_A.weight") for k in lora if k.endswith(".lora_A.weight")}
    assert not any(k.endswith((".lora.down.weight", ".lora.up.weight")) for k in lora)  # one naming (peft's)
    assert targets
    for name, w in base.items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in targets:
            delta = lora[f"unet.{module}.lora_B.weight"] @ lora[f"unet.{module}.lora_A.weight"]
            torch.testing.assert_close(fused[name], w + delta, rtol=1e-5, atol=1e-6)
        else:
            torch.testing.assert_close(fused[name], w, rtol=0, atol=0)
    assert any(not torch.equal(fused[n], base[n]) for n in base)

    # rerunning finds both rounds done and redoes nothing
    mtime = (r2 / "round.json").stat().st_mtime_ns
    assert main(argv) == 0
    assert (r2 / "round.json").stat().st_mtime_ns == mtime


def test_shipped_ai_feedback_config_loads():
    cfg = load_config(REPO / "configs" / "sd15_dpo_ai_feedback.yaml")
    assert (cfg.train.beta, cfg.train.max_steps, cfg.train.method) == (5000.0, 1000, "dpo")
    assert cfg.data.format == "manifest" and cfg.data.source.endswith("pairs.jsonl")
