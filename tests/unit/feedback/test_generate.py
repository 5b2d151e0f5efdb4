"""`generate-pairs`: pairing strategies, margins, recorded seeds that regenerate each image, resume == uninterrupted."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_dpo.errors import ConfigError
from diffusion_dpo.evaluate.prompts import Prompt, PromptSet
from diffusion_dpo.evaluate.sampling import image_seed
from diffusion_dpo.feedback.chunks import FAIL_ENV, InjectedFailure
from diffusion_dpo.feedback.generate import form_pairs, generate_pairs
from diffusion_dpo.feedback.judge import load_judge

PROMPTS = PromptSet("test", "inline", (Prompt("a red circle"), Prompt("a blue square"), Prompt("a small green cat")))
FAST = dict(steps=2, resolution=32, progress=False)


def test_form_pairs_strategies():
    scores = [0.3, 0.9, 0.1, 0.5]
    assert form_pairs(scores, "best-worst") == [(1, 2)]
    assert form_pairs(scores, "best-worst", margin=0.9) == []  # 0.8 < 0.9
    assert sorted(form_pairs(scores, "all", margin=0.35)) == [(1, 0), (1, 2), (1, 3), (3, 2)]  # not (0, 2), (3, 0): 0.2
    assert all(scores[w] - scores[l] >= 0.35 for w, l in form_pairs(scores, "all", margin=0.35))
    pairs = form_pairs(scores, "random", rng=random.Random("0:7"))
    assert len(pairs) == 2 and len({i for p in pairs for i in p}) == 4  # K//2 disjoint pairs
    assert pairs == form_pairs(scores, "random", rng=random.Random("0:7"))  # seeded: reproducible
    assert form_pairs([0.5, 0.5, 0.5], "all") == []  # exact ties have no winner
    with pytest.raises(ConfigError, match="--strategy"):
        form_pairs(scores, "best")


def test_k4_pairs_respect_margin_and_seeds_regenerate_images(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    judge = load_judge(["feedback_test_rewards:brightness"])
    out = tmp_path / "gen"
    # the tiny model's images differ little in brightness: take the median gap of a margin-0 run as the margin
    free = generate_pairs(str(tiny_sd), PROMPTS, tmp_path / "free", judge, images_per_prompt=4, strategy="all",
                          seed=3, **FAST)
    gaps = sorted(json.loads(x)["margin"] for x in free.manifest.read_text().splitlines())
    margin = gaps[len(gaps) // 2]
    result = generate_pairs(str(tiny_sd), PROMPTS, out, judge, images_per_prompt=4, strategy="all", margin=margin,
                            seed=3, **FAST)
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    pairs = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    assert result.images == len(samples) == 12
    # exactly the pairs whose winner outscores its loser by the margin
    expected = set()
    for p in range(3):
        s = {x["image_index"]: x["score"] for x in samples if x["prompt_index"] == p}
        for a, b in itertools.combinations(range(4), 2):
            w, l = (a, b) if s[a] >= s[b] else (b, a)
            if s[w] - s[l] >= margin:
                expected.add((p, w, l))
    assert {(r["prompt_index"], r["image_index_chosen"], r["image_index_rejected"]) for r in pairs} == expected
    assert 0 < len(pairs) < 18  # the margin drops some, keeps some
    for r in pairs:
        assert r["score_chosen"] - r["score_rejected"] >= margin
        assert r["seeds"] == {"chosen": image_seed(3, r["prompt_index"], r["image_index_chosen"]),
                              "rejected": image_seed(3, r["prompt_index"], r["image_index_rejected"])}
    # any image can be regenerated alone from its recorded seed and the recorded sampler settings
    record = json.loads((out / "generation.json").read_text())
    assert record["sampler"]["steps"] == 2 and record["seed"] == 3
    row = pairs[-1]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(row["prompt"], num_inference_steps=2, height=32, width=32,
                 generator=torch.Generator("cpu").manual_seed(row["seeds"]["chosen"])).images[0]
    # same noise; batching (4 images per call there, 1 here) may move float32 sums by an ulp, hence the tolerance
    stored = np.asarray(Image.open(out / row["chosen"]), dtype=np.int16)
    assert np.abs(np.asarray(image, dtype=np.int16) - stored).max() <= 1
    other = np.asarray(Image.open(out / row["rejected"]), dtype=np.int16)
    assert np.abs(other - stored).max() > 1  # a different seed gives a different image


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_interrupted_then_resumed_equals_uninterrupted(tiny_sd, tmp_path, monkeypatch):
    judge = load_judge(["feedback_test_rewards:brightness"])
    kw = dict(images_per_prompt=2, strategy="best-worst", chunk_size=1, sample_batch_size=2, **FAST)
    generate_pairs(str(tiny_sd), PROMPTS, tmp_path / "straight", judge, **kw)
    monkeypatch.setenv(FAIL_ENV, "1")
    with pytest.raises(InjectedFailure):
        generate_pairs(str(tiny_sd), PROMPTS, tmp_path / "resumed", judge, **kw)
    assert not (tmp_path / "resumed" / "pairs.jsonl").exists()
    monkeypatch.delenv(FAIL_ENV)
    generate_pairs(str(tiny_sd), PROMPTS, tmp_path / "resumed", judge, **kw)
    assert _tree(tmp_path / "resumed") == _tree(tmp_path / "straight")


def test_needs_two_images_per_prompt(tiny_sd, tmp_path):
    with pytest.raises(ConfigError, match="images-per-prompt"):
        generate_pairs(str(tiny_sd), PROMPTS, tmp_path, load_judge(["feedback_test_rewards:brightness"]),
                       images_per_prompt=1, **FAST)
