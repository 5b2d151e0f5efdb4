"""One batch contract: the pixel encoder and the cache encoder turn the same pairs into the same PairBatch."""

from __future__ import annotations

import pytest
import torch

from diffusion_dpo.config import load_config
from diffusion_dpo.data.synthetic import write_manifest
from diffusion_dpo.models.families import detect_spec, family_of
from diffusion_dpo.train.batch import CachedEncoder, CachedPairs, EpochItems, PixelEncoder, PixelPairs, open_pairs


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sdxl"])
def test_cached_batches_equal_on_the_fly_batches(fixture, request, tmp_path):
    model = request.getfixturevalue(fixture)
    source = write_manifest(tmp_path / "data", n=4, size=(40, 48))
    common = [f"model.pretrained={model}", f"data.source={source}", "data.resolution=32", "data.crop=center",
              "data.random_flip=false", "data.latent_sampling=sample", "data.caption_dropout=0.5", "train.seed=5",
              "output.report_to=none", f"output.dir={tmp_path / 'out'}"]
    fly_cfg = load_config(None, common)
    cached_cfg = load_config(None, [*common, f"data.cache_dir={tmp_path / 'cache'}", "data.cache_dtype=float32"])
    family = family_of(detect_spec(str(model)))
    fly, cached = open_pairs(fly_cfg, family), open_pairs(cached_cfg, family)
    assert isinstance(fly, PixelPairs) and isinstance(cached, CachedPairs)
    fly_enc, cached_enc = fly.encoder(fly_cfg, family, "cpu"), cached.encoder(cached_cfg, family, "cpu")
    assert isinstance(fly_enc, PixelEncoder) and isinstance(cached_enc, CachedEncoder)
    keys = [(1, i) for i in (3, 0, 2, 1)]  # epoch 1, a shuffled order
    a = fly_enc(fly.collate([EpochItems(fly.dataset)[k] for k in keys]))
    b = cached_enc(cached.collate([EpochItems(cached.dataset)[k] for k in keys]))
    # the pair's own randomness is identical; the encodings agree to float32 precision (batched VAE calls differ)
    for name in ("noise", "timesteps"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    for name in ("latents_w", "latents_l"):
        assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-5)
    assert torch.allclose(a.cond.prompt_embeds, b.cond.prompt_embeds, atol=1e-5)
    if fixture == "tiny_sdxl":
        assert torch.allclose(a.cond.pooled_prompt_embeds, b.cond.pooled_prompt_embeds, atol=1e-5)
        assert torch.equal(a.pair_cond, b.pair_cond) and a.pair_cond.shape == (8, 6)
    else:
        assert a.pair_cond is None and b.pair_cond is None
