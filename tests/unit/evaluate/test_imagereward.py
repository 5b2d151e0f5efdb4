"""ImageReward against the reference implementation's own forward.

tests/fixtures/imagereward was written by scripts/imagereward_reference_fixture.py, which ran the PyPI
package image-reward 1.5 (transformers 4.36) on a small random-weight model (ViT and BERT of width 32, two
layers each): its state dict in the reference's key names, its med_config.json and vocabulary, five images
and the reference's `ImageReward.score(prompt, image)` for seven pairs, its token ids and the row/column
sums of its preprocessed pixels. Our code must reproduce all of them from the reference's weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffusion_dpo.errors import ModelLoadError
from diffusion_dpo.evaluate.rewards import load_reward
from diffusion_dpo.evaluate.rewards.imagereward import MAX_TOKENS, blip_pixels, imagereward_to_transformers

FIXTURE = Path(__file__).parents[2] / "fixtures" / "imagereward"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
VISION = EXPECTED["arch"]["vision"]  # the small ViT the fixture was built with
WEIGHTS = FIXTURE / "ImageReward.safetensors"


def _pairs():
    images = [Image.open(FIXTURE / "images" / p["image"]) for p in EXPECTED["pairs"]]
    prompts = [EXPECTED["prompts"][p["prompt"]] for p in EXPECTED["pairs"]]
    return images, prompts, torch.tensor([p["score"] for p in EXPECTED["pairs"]])


@pytest.fixture(scope="module")
def reward():
    return load_reward(f"imagereward={WEIGHTS}", vision_config=VISION, batch_size=3)


def test_scores_match_the_reference_forward_on_random_weights(reward):
    images, prompts, expected = _pairs()
    scores = reward.score(images, prompts)  # batches of 3: padding masks and batching must not matter
    assert scores.shape == (7,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)
    assert expected.std() > 0.3  # the fixture's scores are spread out: a wrong layer would show
    assert reward.name == "imagereward" and "(mlp - 0.16717362830052426) / 1.0333394966054072" in reward.info["scale"]


def test_tokenization_matches_the_reference(reward):
    tok = reward.tokenizer(EXPECTED["prompts"], padding="max_length", truncation=True, max_length=MAX_TOKENS)
    assert tok["input_ids"] == EXPECTED["input_ids"]
    assert tok["attention_mask"] == EXPECTED["attention_mask"]
    # by hand: the 42-word prompt keeps [CLS] + 33 words + [SEP]; "Café." -> [CLS] cafe . [SEP]
    long = EXPECTED["input_ids"][3]
    assert len(long) == 35 and long[0] == 2 and long[-1] == 3 and 0 not in long
    assert EXPECTED["input_ids"][2][:4] == [2, 17, 23, 3]


def test_preprocessing_matches_the_reference_transform():
    """Row and column sums of the reference's pixels pin the resize size (torchvision truncates the long
    side: 48x64 -> 224x298, round() would give 299), the crop offset (62x40 -> 347x224, left offset
    round(61.5) = 62, floor would give 61) and the normalisation."""
    sums = load_file(str(FIXTURE / "pixel_sums.safetensors"))
    for name in {p["image"] for p in EXPECTED["pairs"]}:
        x = blip_pixels([Image.open(FIXTURE / "images" / name).convert("RGB")], 224)[0]
        torch.testing.assert_close(x.sum(2), sums[f"{name}.rows"], rtol=0, atol=2e-4)
        torch.testing.assert_close(x.sum(1), sums[f"{name}.cols"], rtol=0, atol=2e-4)


def test_key_map_splits_the_checkpoint_and_drops_only_unused_keys():
    sd = load_file(str(WEIGHTS))
    vision, text, head = imagereward_to_transformers(sd)
    unused = [k for k in sd if k.startswith(("blip.vision_proj.", "blip.text_proj.")) or k.endswith("position_ids")]
    assert len(vision) + len(text) + len(head) + len(unused) == len(sd)  # every other key is kept, none twice
    assert sorted(unused) == ["blip.text_encoder.embeddings.position_ids", "blip.text_proj.bias",
                              "blip.text_proj.weight", "blip.vision_proj.bias", "blip.vision_proj.weight"]
    assert torch.equal(vision["encoder.layers.1.self_attn.projection.weight"],
                       sd["blip.visual_encoder.blocks.1.attn.proj.weight"])
    assert torch.equal(vision["embeddings.class_embedding"], sd["blip.visual_encoder.cls_token"])
    assert torch.equal(text["encoder.layer.0.crossattention.self.key.weight"],
                       sd["blip.text_encoder.encoder.layer.0.crossattention.self.key.weight"])
    assert sorted(head) == [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("bias", "weight")]


@pytest.mark.fault(input="ImageReward checkpoint with a key of another model",
                   behaviour="`ModelLoadError` naming the key")
def test_a_foreign_state_dict_is_refused_naming_the_key():
    with pytest.raises(ModelLoadError, match="key 'visual.proj' has no counterpart"):
        imagereward_to_transformers({"visual.proj": torch.zeros(2)})


def test_release_layout_folder_with_a_torch_pickle(tmp_path):
    """The hub release is ImageReward.pt (a torch pickle of the state dict) beside med_config.json; a folder
    that also holds BERT's vocab.txt needs no hub access for the tokenizer."""
    torch.save(load_file(str(WEIGHTS)), tmp_path / "ImageReward.pt")
    for name in ("med_config.json", "vocab.txt"):
        shutil.copy(FIXTURE / name, tmp_path / name)
    images, prompts, expected = _pairs()
    scores = load_reward(f"imagereward={tmp_path}", vision_config=VISION).score(images, prompts)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)


@pytest.mark.fault(input="ImageReward checkpoint without med_config.json beside it",
                   behaviour="`ModelLoadError`: names the checkpoint and `imagereward.med_config`")
def test_missing_med_config_is_one_clear_line(tmp_path):
    shutil.copy(WEIGHTS, tmp_path / "ImageReward.safetensors")
    with pytest.raises(ModelLoadError, match="no med_config.json next to .*imagereward.med_config=PATH") as info:
        load_reward(f"imagereward={tmp_path / 'ImageReward.safetensors'}", vision_config=VISION)
    assert "\n" not in str(info.value)


@pytest.mark.fault(input="ImageReward checkpoint of another size than ViT-L/16",
                   behaviour="`ModelLoadError`: does not fit the BLIP ViT-L/16, with both sizes")
def test_a_checkpoint_of_the_wrong_size_is_refused():
    with pytest.raises(ModelLoadError, match="ViT-L/16: .*width 32 and 2 layers, the BLIP ViT-L/16 1024 and 24") as info:
        load_reward(f"imagereward={WEIGHTS}")  # the default architecture is the release's ViT-L/16
    assert "\n" not in str(info.value)


@pytest.mark.fault(input="ImageReward tokenizer larger than the checkpoint's vocabulary",
                   behaviour="`ModelLoadError`: says to pass the bert-base-uncased tokenizer")
def test_a_tokenizer_that_does_not_fit_the_embedding_is_refused(tmp_path):
    (tmp_path / "vocab.txt").write_text((FIXTURE / "vocab.txt").read_text() + "zebra\nhorse\n")
    with pytest.raises(ModelLoadError, match="29 tokens but the checkpoint embeds 27"):
        load_reward(f"imagereward={WEIGHTS}", vision_config=VISION, tokenizer=str(tmp_path))


# ------------------------------------------------------------------------------------------------
# The command line: `evaluate --metrics imagereward`, `label --reward imagereward`
# ------------------------------------------------------------------------------------------------


def _sample_folders(root: Path) -> Path:
    """Two hand-made sample folders (as `diffusion-dpo sample` writes them) holding the fixture's pairs."""
    images, prompts, _ = _pairs()
    for model in ("base", "tuned"):
        folder = root / model
        folder.mkdir(parents=True)
        lines = []
        for i, (im, prompt) in enumerate(zip(images, prompts)):
            im.save(folder / f"{i:05d}_00.png")
            lines.append(json.dumps({"prompt_index": i, "image_index": 0, "prompt": prompt, "seed": i,
                                     "category": "all", "file": f"{i:05d}_00.png"}))
        (folder / "samples.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_evaluate_cli_scores_with_imagereward(tmp_path, capsys):
    from diffusion_dpo.cli import main

    samples = _sample_folders(tmp_path / "samples")
    code = main(["evaluate", "--samples", str(samples), "--out", str(tmp_path / "report"), "--quiet",
                 "--bootstrap", "10", "--metrics", f"imagereward={WEIGHTS}",
                 "--metric-option", f"imagereward.vision_config={json.dumps(VISION)}"])
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (tmp_path / "report" / "scores.jsonl").read_text().splitlines()]
    base = sorted((r for r in rows if r["model"] == "base" and r["metric"] == "imagereward"),
                  key=lambda r: r["prompt_index"])
    torch.testing.assert_close(torch.tensor([r["score"] for r in base]), _pairs()[2], rtol=0, atol=1e-5)


@pytest.mark.fault(input="`--metrics imagereward` / `--reward imagereward` offline without a cached checkpoint",
                   behaviour="exit 2: one line naming THUDM/ImageReward, saying offline, and the flag for a local copy")
def test_cli_offline_without_the_checkpoint_is_one_line(tmp_path, capsys, monkeypatch):
    from diffusion_dpo.cli import main
    from diffusion_dpo.data.synthetic import write_pickapic_parquet

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    samples = _sample_folders(tmp_path / "samples")
    capsys.readouterr()
    assert main(["evaluate", "--samples", str(samples), "--out", str(tmp_path / "r"), "--quiet",
                 "--metrics", "imagereward"]) == 2
    err = capsys.readouterr().err
    assert "THUDM/ImageReward" in err and "offline" in err and "--metric imagereward=PATH" in err
    assert err.count("\n") == 1

    parquet = write_pickapic_parquet(tmp_path / "pp.parquet", n=2)
    assert main(["label", "--data", str(parquet), "--reward", "imagereward", "--out", str(tmp_path / "lab"),
                 "--no-progress"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "THUDM/ImageReward" in errors[0] and "offline" in errors[0]
