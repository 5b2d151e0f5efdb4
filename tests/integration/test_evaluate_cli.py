"""`diffusion-dpo sample` and `diffusion-dpo evaluate` end to end on tiny pipelines and tiny reward models."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from diffusion_dpo.cli import main

FAST = ["--steps", "2", "--resolution", "32", "--images-per-prompt", "2", "--quiet"]
JUDGES = '''
import numpy as np

def brightness(images, prompts):
    return [float(np.asarray(im, dtype=np.float32).mean()) for im in images]
'''


@pytest.fixture
def world(tmp_path, tiny_sd, monkeypatch):
    """A prompt file, a judges module on sys.path, a tiny CLIP (PickScore-shaped) and a degraded copy of
    the tiny pipeline whose VAE decoder output is shifted down (every image darker)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from diffusion_dpo.models.build import build_clip_tokenizer

    (tmp_path / "prompts.csv").write_text("prompt,category\n" + "".join(
        f"a {c} cat {i},{'animals' if i % 2 else 'colors'}\n" for i, c in enumerate(["red", "blue", "green"] * 2)))
    (tmp_path / "eval_judges.py").write_text(JUDGES)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    tok = build_clip_tokenizer(["a", "red", "cat"])
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    clip = CLIPModel(CLIPConfig(text_config=dict(small, vocab_size=len(tok), bos_token_id=0, eos_token_id=1),
                                vision_config=dict(small, image_size=32, patch_size=16), projection_dim=16))
    clip.save_pretrained(tmp_path / "clip")
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(tmp_path / "clip")
    degraded = tmp_path / "degraded_pipe"
    shutil.copytree(tiny_sd, degraded)
    vae = AutoencoderKL.from_pretrained(tiny_sd / "vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias.sub_(1.0)  # pixels in [-1, 1]: every image 0.5 darker before clipping
    vae.save_pretrained(degraded / "vae")
    yield tmp_path
    sys.modules.pop("eval_judges", None)


def _sample(world, base, name):
    assert main(["sample", "--base", str(base), "--name", name, "--out", str(world / "samples"),
                 "--prompts", str(world / "prompts.csv"), *FAST]) == 0


def test_sample_and_evaluate_end_to_end(world, tiny_sd, capsys):
    _sample(world, tiny_sd, "base")
    _sample(world, tiny_sd, "copy")  # the same model again: identical images
    _sample(world, world / "degraded_pipe", "degraded")
    out = world / "report"
    rc = main(["evaluate", "--samples", str(world / "samples"), "--out", str(out), "--baseline", "base",
               "--metrics", f"eval_judges:brightness,pickscore={world / 'clip'}", "--bootstrap", "500", "--quiet"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    get = {(e["model"], e["metric"]): e for e in results["entries"]}
    for metric in ("eval_judges:brightness", "pickscore"):
        same = get["copy", metric]["vs_baseline"]
        assert same["win_rate"] == 0.5 and same["ci_low"] <= 0.5 <= same["ci_high"] and same["ties"] == 6
        assert "vs_baseline" not in get["base", metric]
    worse = get["degraded", "eval_judges:brightness"]["vs_baseline"]
    assert worse["win_rate"] == 0.0 and worse["ci_high"] < 0.5 and worse["losses"] == 6
    e = get["degraded", "pickscore"]
    # provenance carried by every number
    assert e["metric_model"] == str(world / "clip") and "logit_scale" in e["scale"] and e["preprocessing"]
    assert e["prompt_set"].endswith("prompts.csv") and e["images_per_prompt"] == 2 and e["num_prompts"] == 6
    assert e["sampler"]["steps"] == 2 and e["seed"] == 0 and "sha256" in e["seed_rule"]
    assert set(e["by_category"]) == {"animals", "colors"}
    md = (out / "results.md").read_text()
    assert "| Model | eval_judges:brightness | pickscore |" in md and "| degraded | 0.0% [" in md
    html = (out / "report.html").read_text()
    assert "<img src='../samples/degraded/00005_01.png'" in html
    lines = (out / "scores.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 3 * 6 * 2  # metrics x models x prompts x images
    assert "Win rate against base" in capsys.readouterr().out


def test_evaluate_errors_are_one_clear_line(world, tiny_sd, capsys):
    _sample(world, tiny_sd, "base")
    _sample(world, tiny_sd, "copy")
    args = ["evaluate", "--samples", str(world / "samples"), "--out", str(world / "r"), "--quiet"]
    capsys.readouterr()
    assert main([*args, "--metrics", "pikscore"]) == 2
    err = capsys.readouterr().err
    assert "unknown metric 'pikscore'" in err and err.count("\n") == 1

    assert main([*args, "--metrics", "pickscore=/nonexistent/ps"]) == 2
    assert "does not exist" in capsys.readouterr().err

    (world / "samples" / "copy" / "00001_00.png").write_bytes(b"not a png")
    assert main([*args, "--metrics", "eval_judges:brightness"]) == 2
    err = capsys.readouterr().err
    assert "00001_00.png cannot be decoded" in err and err.count("\n") == 1

    (world / "samples" / "copy" / "00001_00.png").unlink()
    assert main([*args, "--metrics", "eval_judges:brightness"]) == 2
    assert "1 of 12 images are missing" in capsys.readouterr().err


def test_a_reward_module_in_the_current_folder_needs_no_pythonpath(world, tiny_sd, monkeypatch, capsys):
    """The console script's sys.path lacks the current folder; `--metrics my_judges:fn` must still find
    ./my_judges.py, as the docs' example implies."""
    _sample(world, tiny_sd, "base")
    here = world / "here"
    here.mkdir()
    (here / "cwd_judges.py").write_text(JUDGES)
    monkeypatch.chdir(here)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    args = ["evaluate", "--samples", str(world / "samples"), "--out", str(world / "r"), "--quiet"]
    try:
        assert main([*args, "--metrics", "cwd_judges:brightness"]) == 0
    finally:
        sys.modules.pop("cwd_judges", None)
    results = json.loads((world / "r" / "results.json").read_text())
    assert results["entries"][0]["metric"] == "cwd_judges:brightness"
    capsys.readouterr()
    assert main([*args, "--metrics", "nowhere_judges:brightness"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no module 'nowhere_judges'" in err and err.count("\n") == 1


def test_evaluate_samples_first_then_scores(world, tiny_sd, tmp_path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd / "unet")
    with torch.no_grad():
        unet.conv_out.bias.add_(0.3)
    unet.save_pretrained(tmp_path / "tuned_unet")
    out = tmp_path / "report"
    rc = main(["evaluate", "--base", str(tiny_sd), "--tuned", f"tuned={tmp_path / 'tuned_unet'}",
               "--prompts", str(world / "prompts.csv"), "--limit", "2", *FAST, "--out", str(out),
               "--metrics", "eval_judges:brightness", "--bootstrap", "100"])
    assert rc == 0
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["base", "tuned"]
    results = json.loads((out / "results.json").read_text())
    assert results["summary"]["baseline"] == "base" and results["summary"]["num_prompts"] == 2
    assert results["summary"]["models"]["tuned"]["unet"] == str(tmp_path / "tuned_unet")


def test_evaluate_implicit_accuracy_only(world, tiny_sd, tmp_path):
    from PIL import Image

    rows = []
    for i in range(3):
        for kind, color in (("w", (200, 30, 30)), ("l", (30, 30, 200))):
            Image.new("RGB", (40, 40), color).save(tmp_path / f"{kind}{i}.png")
        rows.append(json.dumps({"prompt": "a red cat", "chosen": f"w{i}.png", "rejected": f"l{i}.png"}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(rows))
    out = tmp_path / "report"
    rc = main(["evaluate", "--base", str(tiny_sd), "--tuned", f"same={tiny_sd}", "--pairs", str(tmp_path / "pairs.jsonl"),
               "--implicit-timesteps", "1", "--out", str(out)])
    assert rc == 0
    r = json.loads((out / "results.json").read_text())["summary"]["implicit_accuracy"]["same"]
    assert (r["pairs"], r["ties"], r["accuracy"]) == (3, 3, 0.0)  # policy == reference: every logit is 0
    assert "| same | 0.0% | 3 | 3 | 1 |" in (out / "results.md").read_text()
