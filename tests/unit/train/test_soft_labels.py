"""Soft labels (loss.soft_labels): each pair's preference probability travels from its manifest row to the loss."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_dpo.config import load_config
from diffusion_dpo.data.synthetic import write_manifest
from diffusion_dpo.errors import ConfigError, DataError
from diffusion_dpo.losses import DPOLoss
from diffusion_dpo.models.families import detect_spec, family_of
from diffusion_dpo.models.loading import load_noise_scheduler, load_unet
from diffusion_dpo.models.reference import Reference
from diffusion_dpo.train.batch import EpochItems, open_pairs
from diffusion_dpo.train.step import pair_errors


def manifest_with(folder, column, values, fmt="jsonl"):
    """write_manifest's pairs with one more column (None: the row lacks it)."""
    return write_manifest(folder, n=len(values), fmt=fmt, columns={column: values})


def config(model, source, tmp_path, *extra):
    return load_config(None, [f"model.pretrained={model}", f"data.source={source}", "data.resolution=32",
                              "output.report_to=none", f"output.dir={tmp_path / 'out'}", "loss.soft_labels=true", *extra])


def batch_of(cfg, model, keys):
    family = family_of(detect_spec(str(model)))
    pairs = open_pairs(cfg, family)
    encoder = pairs.encoder(cfg, family, "cpu")
    return family, encoder(pairs.collate([EpochItems(pairs.dataset)[k] for k in keys]))


def test_pref_prob_column_reaches_the_pair_errors_in_batch_order(tiny_sd, tmp_path):
    probs = [0.9, 0.25, 0.5, 1.0]
    cfg = config(tiny_sd, manifest_with(tmp_path / "d", "pref_prob", probs), tmp_path)
    order = [3, 0, 2, 1]
    family, batch = batch_of(cfg, tiny_sd, [(0, i) for i in order])
    expected = torch.tensor([probs[i] for i in order], dtype=torch.float32)
    assert torch.equal(batch.pref_prob, expected)
    spec = detect_spec(str(tiny_sd))
    unet = load_unet(spec).eval()
    with torch.no_grad():
        errors = pair_errors(unet, Reference(unet, lora=False), family, load_noise_scheduler(spec), batch)
        assert torch.equal(errors.pref_prob, expected)
        # and the loss reads them: policy == reference, logit 0, so each pair's loss is ln 2 whatever p is
        out = DPOLoss(5000, soft_labels=True)(errors)
    assert torch.allclose(out.per_pair, torch.full((4,), math.log(2)), atol=1e-6)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_margin_column_gives_sigmoid_of_margin_over_temperature(tiny_sd, tmp_path, fmt):
    margins = [2.0, -1.0, 0.0, 0.5]
    cfg = config(tiny_sd, manifest_with(tmp_path / "d", "margin", margins, fmt), tmp_path, "loss.soft_label_temperature=0.5")
    _, batch = batch_of(cfg, tiny_sd, [(0, i) for i in (1, 3, 0, 2)])
    by_hand = [1 / (1 + math.exp(-m / 0.5)) for m in (margins[1], margins[3], margins[0], margins[2])]
    assert batch.pref_prob.tolist() == pytest.approx(by_hand, abs=1e-7)


def test_hard_labels_carry_no_probability(tiny_sd, tmp_path):
    cfg = load_config(None, [f"model.pretrained={tiny_sd}", f"data.source={write_manifest(tmp_path / 'd', n=2)}",
                             "data.resolution=32", "output.report_to=none", f"output.dir={tmp_path / 'out'}"])
    _, batch = batch_of(cfg, tiny_sd, [(0, 0), (0, 1)])
    assert batch.pref_prob is None


@pytest.mark.fault(input="`loss.soft_labels=true` with data that has neither `pref_prob` nor `margin` column",
                   behaviour="exit 2 at setup: names loss.soft_labels and both columns")
def test_data_without_either_column_is_refused(tiny_sd, tmp_path):
    cfg = config(tiny_sd, write_manifest(tmp_path / "d", n=2), tmp_path)
    with pytest.raises(DataError, match=r"loss.soft_labels=true .* neither a pref_prob column .* nor a margin column"):
        open_pairs(cfg, family_of(detect_spec(str(tiny_sd))))


@pytest.mark.fault(input="`pref_prob` outside [0, 1], or a row without a value", behaviour="exit 2: names file, line and column")
@pytest.mark.parametrize("values, match", [([0.5, 1.5], r"manifest.jsonl pair line2: pref_prob must be in \[0, 1\].*1.5"),
                                           ([0.5, None], r"manifest.jsonl pair line2: column pref_prob must be a finite number")])
def test_bad_pref_prob_rows_are_refused(tiny_sd, tmp_path, values, match):
    cfg = config(tiny_sd, manifest_with(tmp_path / "d", "pref_prob", values), tmp_path)
    with pytest.raises(DataError, match=match):
        open_pairs(cfg, family_of(detect_spec(str(tiny_sd))))


@pytest.mark.fault(input="`loss.soft_labels=true` with a prepared cache (`data.cache_dir` or `data.format=cache`)",
                   behaviour="exit 2 at setup: the cache keeps no preference column; names the fix")
def test_soft_labels_with_a_prepared_cache_are_refused(tiny_sd, tmp_path):
    source = manifest_with(tmp_path / "d", "pref_prob", [0.5, 0.7])
    cfg = config(tiny_sd, source, tmp_path, f"data.cache_dir={tmp_path / 'cache'}")
    with pytest.raises(DataError, match="loss.soft_labels=true cannot read a prepared latent cache"):
        open_pairs(cfg, family_of(detect_spec(str(tiny_sd))))
    assert not (tmp_path / "cache").exists()  # refused before preparing (no VAE loaded)


@pytest.mark.fault(input="`loss.soft_label_temperature` <= 0, or set without `loss.soft_labels`",
                   behaviour="exit 2: names the key and the fix")
@pytest.mark.parametrize("overrides, match", [(["loss.soft_labels=true", "loss.soft_label_temperature=0"],
                                               "loss.soft_label_temperature must be > 0"),
                                              (["loss.soft_label_temperature=2"], "loss.soft_labels is off")])
def test_bad_temperature_is_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)
