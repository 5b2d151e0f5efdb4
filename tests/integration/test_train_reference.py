"""train.reference: cached == live (the same noise and timesteps drawn: bit-identical losses and weights, LoRA and
full), what happens past the stored epochs, `prepare` computing the store, and a broken store failing in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusion_dpo.cache.reference_store import REFERENCE_MANIFEST, epoch_name
from diffusion_dpo.cli import main
from diffusion_dpo.config import load_config
from diffusion_dpo.data.synthetic import write_manifest
from diffusion_dpo.errors import ConfigError, DataError
from diffusion_dpo.train.trainer import Trainer, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("ref"), n=8)


def _overrides(model, source, out, cache, *extra) -> list[str]:
    # every per-pair draw in play: flips (cache variants), caption dropout, latent sampling, noise, timestep
    return [f"model.pretrained={model}", f"data.source={source}", "data.resolution=32", "data.random_flip=true",
            "data.caption_dropout=0.25", "data.latent_sampling=sample", f"data.cache_dir={cache}",
            "data.cache_dtype=float32", "train.batch_size=2", "train.max_steps=6", "train.learning_rate=1e-3",
            "train.checkpoint_every=0", "lora.rank=4", "output.report_to=none", f"output.dir={out}", *extra]


def _run(model, source, out, cache, *extra) -> list[dict]:
    train(load_config(None, _overrides(model, source, out, cache, *extra)), progress=False)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out: Path, finetune: str) -> dict[str, torch.Tensor]:
    if finetune == "lora":
        return load_file(str(out / "pytorch_lora_weights.safetensors"))
    return load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))


def _store(cache: Path) -> Path:
    (folder,) = list(cache.glob("*/references/*"))
    return folder


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_cached_reference_equals_live_bit_for_bit(tmp_path, tiny_sd, data, finetune):
    """8 pairs, batch 2, 6 steps: two epochs, both stored. The store is computed in the micro-batches training
    forms, so the reference errors, every loss and the final weights are bit-identical to a live reference."""
    cache = tmp_path / "cache"
    live = _run(tiny_sd, data, tmp_path / "live", cache, f"train.finetune={finetune}")
    cached_cfg = load_config(None, _overrides(tiny_sd, data, tmp_path / "cached", cache, f"train.finetune={finetune}",
                                              "train.reference=cached", "train.reference_epochs=2"))
    trainer = Trainer(cached_cfg).setup()
    assert trainer.reference is None  # no reference network held while training (full: no frozen copy)
    trainer.train()
    cached = [json.loads(line) for line in (tmp_path / "cached" / "metrics.jsonl").read_text().splitlines()]
    keys = ("loss", "grad_norm", "err_ref_w", "err_ref_l", "err_policy_w", "err_policy_l", "implicit_acc")
    assert [[r[k] for k in keys] for r in cached] == [[r[k] for k in keys] for r in live]
    assert cached[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)  # ln 2: policy == stored reference
    wa, wb = _weights(tmp_path / "live", finetune), _weights(tmp_path / "cached", finetune)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    folder = _store(cache)
    assert sorted(p.name for p in folder.iterdir()) == [epoch_name(0), epoch_name(1), REFERENCE_MANIFEST]


def test_epochs_past_the_store_repeat_the_first_epochs_draws(tmp_path, tiny_sd, data):
    """reference_epochs=1, batch 8 = every pair per step: step 2 (epoch 1) draws epoch 0's noise and timesteps for
    the same 8 pairs, so its mean reference errors equal step 1's; a live run draws new ones."""
    extra = ("train.batch_size=8", "train.max_steps=2")
    live = _run(tiny_sd, data, tmp_path / "live", tmp_path / "cache", *extra)
    cached = _run(tiny_sd, data, tmp_path / "cached", tmp_path / "cache", *extra, "train.reference=cached")
    for key in ("err_ref_w", "err_ref_l"):  # the same 8 numbers, averaged in another order (epoch 1's permutation)
        assert cached[1][key] == pytest.approx(cached[0][key], rel=1e-6)
        assert cached[0][key] == live[0][key]
        assert abs(live[1][key] - live[0][key]) > 1e-3 * live[0][key]  # new draws


def test_prepare_computes_the_store_and_train_reuses_it(tmp_path, tiny_sd, data, capsys, monkeypatch):
    cache = tmp_path / "cache"
    args = _overrides(tiny_sd, data, tmp_path / "out", cache, "train.reference=cached", "train.reference_epochs=3")
    assert main(["prepare", "--no-progress", *args]) == 0
    assert "reference errors: 3 epochs x 8 pairs" in capsys.readouterr().out
    folder = _store(cache)
    stored = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert len(stored) == 4
    from diffusion_dpo.train import reference_cache

    monkeypatch.setattr(reference_cache, "_compute", lambda *a, **k: pytest.fail("the store was computed again"))
    train(load_config(None, args), progress=False)  # a different learning rate or loss would reuse it too
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stored
    # a different seed draws other noise: another store
    monkeypatch.undo()
    train(load_config(None, [*args, "train.seed=1", f"output.dir={tmp_path / 'seed1'}"]), progress=False)
    assert len(list(cache.glob("*/references/*"))) == 2


@pytest.fixture
def stored(tmp_path, tiny_sd, data):
    """A computed store and the config that reads it."""
    args = _overrides(tiny_sd, data, tmp_path / "out", tmp_path / "cache", "train.reference=cached",
                      "train.max_steps=1")
    train(load_config(None, args), progress=False)
    shutil.rmtree(tmp_path / "out")
    return _store(tmp_path / "cache") / epoch_name(0), args


def _setup_error(args) -> str:
    with pytest.raises(DataError) as err:
        Trainer(load_config(None, args)).setup()
    message = str(err.value)
    assert "\n" not in message
    return message


def _broken(stored, corrupt) -> tuple[Path, str]:
    """Corrupt the stored epoch file with `corrupt(path)`; the one-line setup error that follows."""
    path, args = stored
    corrupt(path)
    return path, _setup_error(args)


@pytest.mark.fault(input="reference store file truncated (`train.reference=cached`)",
                   behaviour="one-line error naming the file: delete it and rerun")
def test_truncated_store_file_is_one_line(stored):
    path, message = _broken(stored, lambda p: p.write_bytes(p.read_bytes()[:40]))
    assert str(path) in message and "cannot be read" in message and "delete it and rerun" in message


@pytest.mark.fault(input="reference store file of another store copied into its place",
                   behaviour="one-line error naming the file, the keys and the fix")
def test_store_file_with_another_key_is_one_line(stored):
    path, message = _broken(stored, lambda p: save_file(load_file(str(p)), str(p),
                                                        {"key": "0123456789abcdef", "epoch": "0", "num_pairs": "8"}))
    assert str(path) in message and "belongs to another store" in message and "0123456789abcdef" in message


@pytest.mark.fault(input="reference store file with the wrong number of pairs or a NaN",
                   behaviour="one-line error naming the file and what is wrong")
def test_store_file_with_wrong_shape_or_nan_is_one_line(stored):
    path, args = stored
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta, errors = f.metadata(), f.get_tensor("errors")
    save_file({"errors": errors[:5].contiguous()}, str(path), meta)
    assert "expected (8, 2) float32" in _setup_error(args)
    errors[3, 1] = float("nan")
    save_file({"errors": errors}, str(path), meta)
    assert "1 non-finite errors" in _setup_error(args)


def test_missing_store_file_is_computed_again(stored):
    path, args = stored
    before = load_file(str(path))["errors"]
    path.unlink()
    Trainer(load_config(None, args)).setup()
    assert torch.equal(load_file(str(path))["errors"], before)


@pytest.mark.fault(input="`train.reference=cached` without a prepared cache (images encoded on the fly)",
                   behaviour="config error: set data.cache_dir or use train.reference=live")
def test_cached_reference_needs_a_cache(tmp_path, tiny_sd, data):
    args = [a for a in _overrides(tiny_sd, data, tmp_path / "out", tmp_path / "c", "train.reference=cached")
            if not a.startswith("data.cache_dir")]
    with pytest.raises(ConfigError, match="needs a prepared latent cache.*data.cache_dir"):
        Trainer(load_config(None, args)).setup()


def test_a_run_that_prepares_the_cache_trains_like_one_that_finds_it(tmp_path, tiny_sd, data):
    """Loading the encoders (first use of data.cache_dir) or the reference network (first use of a cached
    reference) must not advance the global RNG the LoRA initialisation draws from."""
    cache = tmp_path / "cache"
    first = _run(tiny_sd, data, tmp_path / "first", cache, "train.max_steps=3")
    again = _run(tiny_sd, data, tmp_path / "again", cache, "train.max_steps=3")
    assert [r["loss"] for r in first] == [r["loss"] for r in again]
    wa, wb = _weights(tmp_path / "first", "lora"), _weights(tmp_path / "again", "lora")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
