"""`generate-pairs`: pairing strategies, margins, recorded seeds that regenerate each image, resume == uninterrupted,
the latent cache written from the sampled latents (--write-cache)."""

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
from diffusion_dpo.feedback.generate import form_pairs, generate_pairs, score_ranks
from diffusion_dpo.feedback.reward_judge import load_judge

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


def _straight_and_resumed(tiny_sd, tmp_path, monkeypatch, fail_after: str, unfinished: str, **kw):
    """Run generate_pairs once straight through, and once killed after chunk `fail_after` (leaving no
    `unfinished` output) then rerun; returns the file trees of both output folders, the judge and the arguments."""
    judge = load_judge(["feedback_test_rewards:brightness"])
    kw = dict(images_per_prompt=2, strategy="best-worst", chunk_size=1, sample_batch_size=2, **FAST, **kw)
    generate_pairs(str(tiny_sd), PROMPTS, tmp_path / "straight", judge, **kw)
    monkeypatch.setenv(FAIL_ENV, fail_after)
    with pytest.raises(InjectedFailure):
        generate_pairs(str(tiny_sd), PROMPTS, tmp_path / "resumed", judge, **kw)
    assert not (tmp_path / "resumed" / unfinished).exists()
    monkeypatch.delenv(FAIL_ENV)
    generate_pairs(str(tiny_sd), PROMPTS, tmp_path / "resumed", judge, **kw)
    return _tree(tmp_path / "straight"), _tree(tmp_path / "resumed"), judge, kw


def test_interrupted_then_resumed_equals_uninterrupted(tiny_sd, tmp_path, monkeypatch):
    straight, resumed, _, _ = _straight_and_resumed(tiny_sd, tmp_path, monkeypatch, "1", "pairs.jsonl")
    assert resumed == straight


def test_needs_two_images_per_prompt(tiny_sd, tmp_path):
    with pytest.raises(ConfigError, match="images-per-prompt"):
        generate_pairs(str(tiny_sd), PROMPTS, tmp_path, load_judge(["feedback_test_rewards:brightness"]),
                       images_per_prompt=1, **FAST)


def test_write_cache_stores_the_sampled_latents_and_trains_without_a_vae(tiny_sd, tmp_path, monkeypatch):
    """--write-cache: a cache CachedPairDataset opens for the same model and resolution, one row per pair of
    pairs.jsonl, whose latents decode (scaling-factor conventions respected) to the saved PNGs; images are
    unchanged by the option; `train` reads it and loads neither a VAE nor a text encoder."""
    import shutil

    from diffusers import AutoencoderKL
    from PIL import Image

    from diffusion_dpo.cache.store import CachedPairDataset, collate_cached
    from diffusion_dpo.config import load_config
    from diffusion_dpo.models.families import detect_spec
    from diffusion_dpo.train import trainer

    # a copy of the tiny model with a VAE scaling factor != 1, so that a missing or doubled division shows
    model = tmp_path / "model"
    shutil.copytree(tiny_sd, model)
    vae_config = model / "vae" / "config.json"
    vae_config.write_text(json.dumps({**json.loads(vae_config.read_text()), "scaling_factor": 0.5}))
    judge = load_judge(["feedback_test_rewards:brightness"])
    kw = dict(images_per_prompt=3, strategy="all", seed=1, chunk_size=2, sample_batch_size=2, **FAST)
    plain = generate_pairs(str(model), PROMPTS, tmp_path / "plain", judge, **kw)
    out = tmp_path / "gen"
    result = generate_pairs(str(model), PROMPTS, out, judge, write_cache=True, cache_dtype="float32", **kw)
    assert result.cache == out / "cache" and plain.cache is None
    # the option changes no image and no pair
    assert _tree(out / "images") == _tree(tmp_path / "plain" / "images")
    assert (out / "pairs.jsonl").read_bytes() == (tmp_path / "plain" / "pairs.jsonl").read_bytes()
    pairs = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) >= 3

    spec = detect_spec(str(model))
    ds = CachedPairDataset(out / "cache", spec, "sample", seed=0, resolution=32)
    assert len(ds) == len(pairs) == result.pairs
    with pytest.raises(Exception, match="resolution"):
        CachedPairDataset(out / "cache", spec, resolution=64)
    vae = AutoencoderKL.from_pretrained(model / "vae")
    sf = vae.config.scaling_factor
    assert sf == 0.5
    for i, row in enumerate(pairs):
        item = ds[i]
        assert torch.equal(item["latent_std"], torch.zeros_like(item["latent_std"]))
        assert item["latent_mean"].shape == (2, 4, 16, 16)
        assert item["original_size"].tolist() == [[32, 32], [32, 32]]
        assert item["crop_top_left"].tolist() == [[0, 0], [0, 0]]
        scaled = item["latent_mean"] * sf  # what the trainer diffuses (mean + std * eps) * scaling factor
        with torch.no_grad():
            pixels = vae.decode(scaled / sf).sample  # and what the pipeline decodes
        decoded = ((pixels / 2 + 0.5).clamp(0, 1) * 255).round().permute(0, 2, 3, 1).numpy().astype(np.int16)
        for j, name in enumerate(("chosen", "rejected")):
            stored = np.asarray(Image.open(out / row[name]).convert("RGB"), dtype=np.int16)
            assert np.abs(decoded[j] - stored).max() <= 2, (i, name)
    batch = collate_cached([ds[0], ds[1]])
    assert batch["latent_mean"].shape == (2, 2, 4, 16, 16) and batch["prompt_embeds"].shape[0] == 2
    manifest = json.loads((out / "cache" / "cache_manifest.json").read_text())
    assert manifest["complete"] and manifest["num_pairs"] == len(pairs)
    assert manifest["settings"]["random_flip"] is False and manifest["model"]["vae_scaling_factor"] == 0.5
    # the cached text conditioning is what `prepare` (PromptEncoder over the model's text encoder) computes
    from diffusion_dpo.models.families import ModelFamily, family_of

    encoder = family_of(spec).prompt_encoder()
    assert torch.allclose(ds[0]["prompt_embeds"], encoder([pairs[0]["prompt"]]).prompt_embeds[0], atol=1e-5)
    assert torch.allclose(ds.empty_conditioning().prompt_embeds, encoder([""]).prompt_embeds, atol=1e-5)

    # training reads the cache and never loads the frozen encoders
    def refuse(*args, **kwargs):
        raise AssertionError("training from a cache must not load a VAE or a text encoder")

    monkeypatch.setattr(ModelFamily, "load_vae", refuse)
    monkeypatch.setattr(ModelFamily, "load_text_encoders", refuse)
    cfg = load_config(None, [f"model.pretrained={model}", f"data.source={out / 'cache'}", "data.resolution=32",
                             "train.finetune=lora", "lora.rank=4", "train.max_steps=2", "train.batch_size=2",
                             "train.checkpoint_every=0", "output.report_to=none", f"output.dir={tmp_path / 'run'}"])
    trainer.train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)


@pytest.mark.parametrize("fixture", ["tiny_sdxl", "tiny_lcm"])
def test_write_cache_sdxl_and_lcm(fixture, request, tmp_path):
    """SDXL (pooled embeddings, two encoders) and LCM (decodes its last `denoised`, not `latents`)."""
    from diffusers import AutoencoderKL
    from PIL import Image

    from diffusion_dpo.cache.store import CachedPairDataset
    from diffusion_dpo.models.families import detect_spec

    model = request.getfixturevalue(fixture)
    out = tmp_path / "gen"
    result = generate_pairs(str(model), PROMPTS, out, load_judge(["feedback_test_rewards:brightness"]),
                            images_per_prompt=2, write_cache=True, cache_dtype="float32", **FAST)
    spec = detect_spec(str(model))
    ds = CachedPairDataset(result.cache, spec, "mean", resolution=32)
    pairs = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(ds) == len(pairs) > 0
    assert ("pooled_prompt_embeds" in ds[0]) == (spec.family == "sdxl")
    vae = AutoencoderKL.from_pretrained(Path(model) / "vae")
    with torch.no_grad():
        pixels = vae.decode(ds[0]["latent_mean"]).sample
    decoded = ((pixels / 2 + 0.5).clamp(0, 1) * 255).round().permute(0, 2, 3, 1).numpy().astype(np.int16)
    stored = np.asarray(Image.open(out / pairs[0]["chosen"]).convert("RGB"), dtype=np.int16)
    assert np.abs(decoded[0] - stored).max() <= 2


def test_write_cache_resumed_equals_uninterrupted(tiny_sd, tmp_path, monkeypatch):
    straight, resumed, judge, kw = _straight_and_resumed(tiny_sd, tmp_path, monkeypatch, "2", "cache",
                                                         write_cache=True)
    assert "cache/shard-00000.safetensors" in straight and "cache/empty_prompt.safetensors" in straight
    manifest = {k for k in straight if k.endswith("cache_manifest.json")}
    assert {k: v for k, v in resumed.items() if k not in manifest} == \
        {k: v for k, v in straight.items() if k not in manifest}
    # the manifests differ only in the absolute path of their source manifest
    a, b = (json.loads(t["cache/cache_manifest.json"]) for t in (straight, resumed))
    a["source"].pop("manifest"), b["source"].pop("manifest")
    assert a == b
    # a run started without the option is not silently continued with it
    with pytest.raises(Exception, match="write_cache"):
        generate_pairs(str(tiny_sd), PROMPTS, tmp_path / "straight", judge,
                       **{**kw, "write_cache": False})


def test_gap_equal_to_the_margin_is_kept():
    # 0.75 - 0.5 == 0.25 exactly (binary fractions): kept, as the docs say (">= margin and > 0")
    assert form_pairs([0.5, 0.75, 0.5], "best-worst", margin=0.25) == [(1, 2)]  # worst: the last of a tie
    assert form_pairs([0.5, 0.75, 0.5], "all", margin=0.25) == [(1, 0), (1, 2)]  # (0, 2): an exact tie


def test_all_ranked_keeps_every_pair_at_or_above_the_threshold_with_its_rank_difference():
    # binary-exact scores; ranks by score: image 1 (1.0) 0, 4 (0.625) 1, 5 (0.5625) 2, 3 (0.5) 3, 0 (0.25) 4, 2 (0) 5
    scores = [0.25, 1.0, 0.0, 0.5, 0.625, 0.5625]
    ranks = score_ranks(scores)
    assert ranks == [4, 0, 5, 3, 1, 2]
    rows = {(w, l): (ranks[l] - ranks[w], scores[w] - scores[l]) for w, l in form_pairs(scores, "all-ranked", 0.125)}
    assert rows == {(1, 0): (4, 0.75), (0, 2): (1, 0.25), (3, 0): (1, 0.25), (4, 0): (3, 0.375), (5, 0): (2, 0.3125),
                    (1, 2): (5, 1.0), (1, 3): (3, 0.5), (1, 4): (1, 0.375), (1, 5): (2, 0.4375), (3, 2): (2, 0.5),
                    (4, 2): (4, 0.625), (5, 2): (3, 0.5625),
                    (4, 3): (2, 0.125)}  # a gap equal to the threshold is kept (>=, as label's margin)
    # (5, 3) and (4, 5) differ by 0.0625 < 0.125: dropped
    assert score_ranks([0.5, 0.75, 0.5]) == [1, 0, 2]  # equal scores ranked by image index


def test_all_ranked_manifest_records_rank_difference_and_trains_a_curriculum(tiny_sd, tmp_path):
    from diffusion_dpo.config import load_config
    from diffusion_dpo.train.trainer import train

    judge = load_judge(["feedback_test_rewards:brightness"])
    out = tmp_path / "gen"
    generate_pairs(str(tiny_sd), PROMPTS, out, judge, images_per_prompt=3, strategy="all-ranked", seed=2, **FAST)
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    pairs = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    assert pairs
    for pair in pairs:
        scores = [s["score"] for s in samples if s["prompt_index"] == pair["prompt_index"]]
        ranks = score_ranks(scores)
        w, l = pair["image_index_chosen"], pair["image_index_rejected"]
        assert pair["rank_difference"] == ranks[l] - ranks[w] >= 1
        assert pair["margin"] == scores[w] - scores[l] > 0 and pair["images_per_prompt"] == 3
    # the columns reach PairRecord.meta and the curriculum reads them: 2 levels, level 2 added after step 1
    cfg = load_config(None, [f"model.pretrained={tiny_sd}", f"data.source={out / 'pairs.jsonl'}", "data.resolution=32",
                             "train.max_steps=2", "train.checkpoint_every=0", "lora.rank=4", "output.report_to=none",
                             f"output.dir={tmp_path / 'run'}", "train.curriculum.enabled=true",
                             "train.curriculum.levels=2", "train.curriculum.steps_per_level=1"])
    train(cfg, progress=False)
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["curriculum_level"] for m in metrics] == [1, 2]
    easy = sum(p["rank_difference"] == 2 for p in pairs)  # M = 3, B = 2: level 1 = (1, 2] = rank difference 2
    assert [m["curriculum_pairs"] for m in metrics] == [easy, len(pairs)]


def test_rerun_cleans_only_its_own_stale_temp_files(tiny_sd, tmp_path):
    judge = load_judge(["feedback_test_rewards:brightness"])
    out = tmp_path / "gen"
    kw = dict(images_per_prompt=2, write_cache=True, **FAST)
    generate_pairs(str(tiny_sd), PROMPTS.limit(1), out, judge, **kw)
    own = [".pairs.jsonl.4242.tmp", ".samples.jsonl.4242.tmp", ".generation.json.4242.tmp", ".run.json.4242.tmp",
           "images/.00000_01.png.4242.tmp", "chunks/.chunk-00000.json.4242.tmp",
           "chunks/.latents-00000.safetensors.4242.tmp", "cache/.shard-00000.safetensors.4242.tmp",
           "cache/.cache_manifest.json.4242.tmp"]
    foreign = [".x.tmp", "notes/.x.tmp", "notes/.pairs.jsonl.4242.tmp", "images/.x.tmp", "images/sub/.x.tmp",
               "chunks/.x.tmp", "cache/.x.tmp"]
    for name in own + foreign:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x")
    generate_pairs(str(tiny_sd), PROMPTS.limit(1), out, judge, **kw)  # all chunks done: nothing sampled again
    assert [n for n in own if (out / n).exists()] == []
    assert [n for n in foreign if not (out / n).exists()] == []


@pytest.mark.fault(input="`generate-pairs --out` a non-empty folder that is not a generate-pairs run",
                   behaviour="exit 2: names the folder and its files; nothing written")
def test_out_folder_holding_other_files_is_refused(tiny_sd, tmp_path, capsys):
    from diffusion_dpo.cli import main

    out = tmp_path / "mine"
    (out / "images").mkdir(parents=True)
    (out / "images" / "00000_00.png").write_bytes(b"my own picture")
    (out / "pairs.jsonl").write_text("my own pairs\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    code = main(["generate-pairs", "--base", str(tiny_sd), "--prompts", str(prompts), "-k", "2", "--steps", "2",
                 "--resolution", "32", "--reward", "feedback_test_rewards:brightness", "--out", str(out),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"--out {out} is not empty (images, pairs.jsonl)" in err
    assert _tree(out) == {"images/00000_00.png": b"my own picture", "pairs.jsonl": b"my own pairs\n"}


def test_identical_tuned_unet_gives_the_base_samples(tiny_sd, tmp_path):
    """Sampling a tuned model uses the base's seeds: a UNet with the base's exact weights draws its images."""
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel.from_pretrained(tiny_sd / "unet").save_pretrained(tmp_path / "unet_copy")
    judge = load_judge(["feedback_test_rewards:brightness"])
    kw = dict(images_per_prompt=2, chunk_size=1, **FAST)
    generate_pairs(str(tiny_sd), PROMPTS.limit(2), tmp_path / "base", judge, **kw)
    generate_pairs(str(tiny_sd), PROMPTS.limit(2), tmp_path / "copy", judge, unet=str(tmp_path / "unet_copy"), **kw)
    base, copy = (_tree(tmp_path / name) for name in ("base", "copy"))
    images = {k for k in base if k.startswith("images/")}
    assert len(images) == 4 and {k: copy[k] for k in images} == {k: base[k] for k in images}
    for name in ("samples.jsonl", "pairs.jsonl"):
        assert copy[name] == base[name]


def test_prepare_and_generate_pairs_write_one_cache_format(tiny_sd, tmp_path):
    """The two makers of caches (`prepare` from images, `generate-pairs --write-cache` from sampled latents) write
    through cache.writer one format: the same file names, tensor names, dtypes and ranks, shard metadata and
    manifest fields; and each writes the same bytes again when rerun (sorted safetensors headers)."""
    from safetensors import safe_open

    from diffusion_dpo.cache.prepare import prepare_cache
    from diffusion_dpo.cache.store import cache_key
    from diffusion_dpo.config import load_config
    from diffusion_dpo.data.synthetic import write_pickapic_parquet

    source = write_pickapic_parquet(tmp_path / "train.parquet", n=5)
    judge = load_judge(["feedback_test_rewards:brightness"])

    def prepared(root: Path) -> Path:
        cfg = load_config(None, [f"model.pretrained={tiny_sd}", f"data.source={source}", "data.resolution=32",
                                 f"data.cache_dir={root}"])
        return prepare_cache(cfg, storage_dtype="float16", batch_size=2, shard_size=3, progress=False)

    def generated(out: Path) -> Path:
        return generate_pairs(str(tiny_sd), PROMPTS, out, judge, images_per_prompt=3, strategy="all", seed=1,
                              write_cache=True, cache_dtype="float16", **FAST).cache

    def read(folder: Path) -> tuple[dict, dict, dict]:
        """manifest, {file: {tensor: (dtype, shape)}}, {file: metadata}"""
        tensors, meta = {}, {}
        for p in sorted(folder.glob("*.safetensors")):
            with safe_open(str(p), "pt") as f:
                tensors[p.name] = {k: (f.get_tensor(k).dtype, tuple(f.get_tensor(k).shape)) for k in f.keys()}
                meta[p.name] = f.metadata()
        return json.loads((folder / "cache_manifest.json").read_text()), tensors, meta

    prep, gen = prepared(tmp_path / "p1"), generated(tmp_path / "g1")
    for folder, num_pairs, shards in ((prep, 5, 2), (gen, None, 1)):
        manifest, tensors, meta = read(folder)
        n = num_pairs or manifest["num_pairs"]
        assert manifest["format_version"] == 3 and manifest["complete"] is True
        assert manifest["key"] == cache_key(manifest["key_inputs"]) and manifest["key_inputs"]["format_version"] == 3
        assert sorted(manifest) == sorted(["format_version", "key", "key_inputs", "complete", "model", "settings",
                                           "source", "num_source_pairs", "shard_size", "num_shards", "shards",
                                           "num_prompts", "num_prompt_shards", "prompt_shards", "num_pairs",
                                           "num_skipped", "bytes", "bytes_per_pair", "bytes_per_pair_without_dedup",
                                           "pairs_per_prompt"])
        assert sorted(manifest["model"]) == ["family", "latent_channels", "pretrained", "revision",
                                             "vae_scaling_factor"]
        p_files = [f"prompts-{j:05d}.safetensors" for j in range(manifest["num_prompt_shards"])]
        assert sorted(tensors) == ["empty_prompt.safetensors", *p_files,
                                   *[f"shard-{k:05d}.safetensors" for k in range(shards)]]
        # the prompt table: every distinct prompt once, row_bytes = one row of prompt_embeds (77 x 32 float16)
        prompts = [p for f in p_files for p in json.loads(meta[f]["prompts"])]
        assert len(prompts) == len(set(prompts)) == manifest["num_prompts"]
        for j, (f, entry) in enumerate(zip(p_files, manifest["prompt_shards"])):
            rows = len(json.loads(meta[f]["prompts"]))
            assert entry == {"file": f, "start": 3 * j, "stop": 3 * j + rows, "rows": rows, "row_bytes": 77 * 32 * 2,
                             "bytes": (folder / f).stat().st_size}
            assert tensors[f] == {"prompt_embeds": (torch.float16, (rows, 77, 32))}
        assert meta["empty_prompt.safetensors"] == {"key": manifest["key"]}
        assert tensors["empty_prompt.safetensors"]["prompt_embeds"][0] == torch.float16
        index, start = manifest["shards"], 0
        assert manifest["num_shards"] == len(index) == shards and manifest["num_pairs"] == n
        for k, entry in enumerate(index):
            name = f"shard-{k:05d}.safetensors"
            kept = entry["stop"] - entry["start"] - len(entry["skipped"])
            assert entry == {"file": name, "start": start, "stop": entry["stop"], "kept": kept, "skipped": [],
                             "bytes": (folder / name).stat().st_size}
            assert meta[name] == {"key": manifest["key"], "start": str(start), "stop": str(entry["stop"]),
                                  "kept": str(kept), "skipped": "[]"}
            t = tensors[name]
            assert {k: v[0] for k, v in t.items()} == {
                "source_index": torch.int64, "prompt_index": torch.int64, "latent_mean": torch.float16,
                "latent_std": torch.float16, "original_size": torch.int64, "crop_top_left": torch.int64}
            assert t["latent_mean"][1] == t["latent_std"][1] == (kept, 1, 2, 4, 16, 16)
            assert t["source_index"][1] == t["prompt_index"][1] == (kept,) and t["original_size"][1] == (kept, 2, 2)
            assert t["crop_top_left"][1] == (kept, 1, 2, 2)
            start = entry["stop"]
        assert manifest["bytes"] == sum(e["bytes"] for e in index + manifest["prompt_shards"])
        assert manifest["bytes_per_pair"] == round(manifest["bytes"] / n)
    assert read(gen)[0]["num_prompts"] < read(gen)[0]["num_pairs"]  # 3 pairs per prompt: each stored once
    # rerun from scratch: the same bytes (only the generate manifest names its own output folder)
    again = prepared(tmp_path / "p2")
    assert again.name == prep.name and _tree(again) == _tree(prep)
    regen = generated(tmp_path / "g2")
    a, b = _tree(gen), _tree(regen)
    assert {k: v for k, v in a.items() if k != "cache_manifest.json"} == \
        {k: v for k, v in b.items() if k != "cache_manifest.json"}
    ma, mb = json.loads(a["cache_manifest.json"]), json.loads(b["cache_manifest.json"])
    assert ma["source"].pop("manifest") != mb["source"].pop("manifest") and ma == mb
