"""End-to-end `diffusion-dpo train` runs on tiny real-class models, and their outputs in stock diffusers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusion_dpo.cli import main
from diffusion_dpo.data.synthetic import write_mixed_size_manifest, write_manifest, write_pickapic_parquet


@pytest.fixture(scope="module")
def pickapic(tmp_path_factory):
    return write_pickapic_parquet(tmp_path_factory.mktemp("pp") / "train.parquet", n=8, ties=2)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("man"), n=8)


def _train(out: Path, model: Path, source: Path, *extra: str) -> int:
    return main(["train", f"model.pretrained={model}", f"data.source={source}", "data.resolution=32",
                 "train.max_steps=2", "train.batch_size=2", "train.checkpoint_every=1", "train.learning_rate=1e-2",
                 "lora.rank=4", "output.report_to=none", f"output.dir={out}", *extra])


def _sample(pipe, seed=0):
    return pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images


@pytest.mark.parametrize("fixture, pipeline", [("tiny_sd", "StableDiffusionPipeline"),
                                               ("tiny_sd_v", "StableDiffusionPipeline"),
                                               ("tiny_sdxl", "StableDiffusionXLPipeline"),
                                               ("tiny_lcm", "LatentConsistencyModelPipeline")])
def test_lora_run_per_family_loads_in_stock_pipeline(fixture, pipeline, request, tmp_path, pickapic):
    import diffusers

    model = request.getfixturevalue(fixture)
    assert _train(tmp_path, model, pickapic) == 0
    for name in ("config.yaml", "metrics.jsonl", "README.md", "pytorch_lora_weights.safetensors", "model_spec.json",
                 "train.log"):
        assert (tmp_path / name).is_file(), name
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # policy == reference at step 1
    for key in ("implicit_acc", "err_policy_w", "err_policy_l", "err_ref_w", "err_ref_l", "diff_policy", "diff_ref",
                "grad_norm", "lr"):
        assert key in rows[0]
    spec = json.loads((tmp_path / "model_spec.json").read_text())
    assert spec["family"] == {"tiny_sdxl": "sdxl", "tiny_lcm": "lcm"}.get(fixture, "sd")
    assert spec["prediction_type"] == ("v_prediction" if fixture == "tiny_sd_v" else "epsilon")

    cls = getattr(diffusers, pipeline)
    pipe = cls.from_pretrained(model, local_files_only=True)
    before = _sample(pipe)
    pipe.load_lora_weights(tmp_path)
    after = _sample(pipe)
    assert before.shape == after.shape
    assert not torch.allclose(torch.from_numpy(before), torch.from_numpy(after))


def test_manifest_source_and_kohya_export(tmp_path, tiny_sd, manifest):
    assert _train(tmp_path, tiny_sd, manifest, "lora.export_kohya=true") == 0
    kohya = load_file(str(tmp_path / "lora_kohya.safetensors"))
    assert kohya and all(k.startswith("lora_unet_") for k in kohya)
    assert any(k.endswith(".alpha") for k in kohya)
    assert any(k.endswith(".lora_down.weight") for k in kohya) and any(k.endswith(".lora_up.weight") for k in kohya)
    diffusers_keys = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
    n_down = sum(k.endswith(".lora_down.weight") for k in kohya)
    assert n_down == sum(k.endswith(".lora_A.weight") for k in diffusers_keys)  # peft key names, one per adapter


def test_full_finetune_writes_unet_folder(tmp_path, tiny_sd, pickapic):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    assert _train(tmp_path, tiny_sd, pickapic, "train.finetune=full", "train.learning_rate=1e-3") == 0
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    base = UNet2DConditionModel.from_pretrained(Path(tiny_sd) / "unet")
    changed = [n for (n, p), (_, q) in zip(unet.named_parameters(), base.named_parameters()) if not torch.equal(p, q)]
    assert changed
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, local_files_only=True)
    before = _sample(pipe)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, unet=unet, local_files_only=True)
    assert not torch.allclose(torch.from_numpy(before), torch.from_numpy(_sample(pipe)))


def test_sft_trains_on_winners_only(tmp_path, tiny_sd, pickapic):
    assert _train(tmp_path, tiny_sd, pickapic, "train.method=sft") == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "err_ref_w" not in rows[0] and rows[0]["loss"] == pytest.approx(rows[0]["err_policy_w"])


def test_learns_the_preference_direction(tmp_path, tiny_sd):
    """Winners are bright, losers dark: the implicit accuracy climbs well above chance in a few dozen steps."""
    source = write_manifest(tmp_path / "data", n=32)
    modules = "[to_q,to_k,to_v,to_out.0,proj_in,proj_out,conv1,conv2,conv_in,conv_out]"
    code = main(["train", f"model.pretrained={tiny_sd}", f"data.source={source}", "data.resolution=32",
                 "data.latent_sampling=mean", "train.max_steps=40", "train.batch_size=8", "train.checkpoint_every=0",
                 "train.learning_rate=1e-3", "train.beta=2000", "lora.rank=8", f"lora.target_modules={modules}",
                 "output.report_to=none", f"output.dir={tmp_path / 'out'}"])
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    first = sum(r["implicit_acc"] for r in rows[:5]) / 5
    last = sum(r["implicit_acc"] for r in rows[-10:]) / 10
    assert first < 0.5
    assert last >= 0.65, [r["implicit_acc"] for r in rows]
    assert sum(r["loss"] for r in rows[-10:]) / 10 < 0.69


@pytest.mark.fault(input="`model.pretrained` folder that does not exist", behaviour="exit 2: names the folder")
@pytest.mark.fault(input="hub id while offline and not cached", behaviour="exit 2: names the id and says offline")
@pytest.mark.fault(input="unknown config key (`train.bta=3`)", behaviour="exit 2: `unknown config key 'train.bta'`")
@pytest.mark.fault(input="ties with `data.drop_ties=false`", behaviour="exit 2: a tie has no winner")
def test_bad_inputs_give_clear_errors(tmp_path, tiny_sd, pickapic, capsys):
    # a model folder that does not exist
    assert _train(tmp_path / "a", tmp_path / "no_such_model", pickapic) == 2
    assert "does not exist" in capsys.readouterr().err
    # a hub id while offline, not cached
    assert _train(tmp_path / "b", "nobody/no-such-model", pickapic) == 2
    err = capsys.readouterr().err
    assert "nobody/no-such-model" in err and "offline" in err
    # an unknown key
    assert main(["train", "train.bta=3"]) == 2
    assert "unknown config key 'train.bta'" in capsys.readouterr().err
    # ties with drop_ties=false: a tie has no winner
    assert _train(tmp_path / "c", tiny_sd, pickapic, "data.drop_ties=false") == 2
    assert "tie" in capsys.readouterr().err.lower()


@pytest.mark.fault(input="undecodable image in a pair", behaviour="pair skipped and counted (`skipped_pairs`); "
                   "exit 2 naming the image with `data.on_corrupt=error`")
def test_corrupt_images_are_counted_or_stop_the_run(tmp_path, tiny_sd, capsys):
    source = write_pickapic_parquet(tmp_path / "bad.parquet", n=4, corrupt=2)
    out = tmp_path / "skip"
    code = main(["train", f"model.pretrained={tiny_sd}", f"data.source={source}", "data.resolution=32",
                 "train.max_steps=2", "train.batch_size=2", "train.checkpoint_every=0", "output.report_to=none",
                 f"output.dir={out}"])
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_pairs"] == 2  # each epoch of 4 pairs meets the 2 corrupt ones once
    assert json.loads((out / "train_summary.json").read_text())["skipped_pairs"] == 2
    code = main(["train", f"model.pretrained={tiny_sd}", f"data.source={source}", "data.resolution=32",
                 "train.max_steps=2", "train.batch_size=2", "data.on_corrupt=error", "output.report_to=none",
                 f"output.dir={tmp_path / 'err'}"])
    assert code == 2
    assert "decode" in capsys.readouterr().err



def _sdxl_batch(tmp_path, model, source, *extra):
    from diffusion_dpo.config import load_config
    from diffusion_dpo.train.trainer import Trainer

    cfg = load_config(None, [f"model.pretrained={model}", f"data.source={source}", "data.resolution=32",
                             "data.crop=center", "train.batch_size=2", "output.report_to=none",
                             f"output.dir={tmp_path / 'o'}", *extra])
    trainer = Trainer(cfg).setup()
    return trainer.batch_encoder(next(iter(trainer.loader)))


def test_sdxl_time_ids_one_row_per_pair_from_the_winner(tmp_path, tiny_sdxl):
    """Default data.sdxl_time_ids=pair (as diffusers' DPO script): the loser is brought to the winner's size
    and crop, and both rows of a pair get the winner's true size and crop, in float32."""
    batch = _sdxl_batch(tmp_path, tiny_sdxl, write_mixed_size_manifest(tmp_path / "m", n=4))
    # winner 40x48 -> short side 32 -> 32x38 (int(32 * 48 / 40) = int(38.4)), centre crop left round(6 / 2) = 3
    expected = torch.tensor([40.0, 48.0, 0.0, 3.0, 32.0, 32.0])
    assert batch.pair_cond.dtype == torch.float32 and batch.pair_cond.shape == (4, 6)
    assert torch.equal(batch.pair_cond, expected.expand(4, 6))


def test_sdxl_time_ids_per_image_option(tmp_path, tiny_sdxl):
    """data.sdxl_time_ids=image: each image's own original size and crop offset."""
    batch = _sdxl_batch(tmp_path, tiny_sdxl, write_mixed_size_manifest(tmp_path / "m", n=4), "data.sdxl_time_ids=image")
    # loser 48x40 (h, w) -> 38x32 (int(32 * 48 / 40) = 38 high), centre crop top round(6 / 2) = 3
    winner, loser = torch.tensor([40.0, 48.0, 0.0, 3.0, 32.0, 32.0]), torch.tensor([48.0, 40.0, 3.0, 0.0, 32.0, 32.0])
    assert torch.equal(batch.pair_cond, torch.stack([winner, winner, loser, loser]))
