from diffusion_dpo.models.build import build_clip_tokenizer


def test_every_word_is_one_token_and_other_text_still_tokenizes():
    words = ["triangle", "right", "circle", "red", "green", "square", "top", "left", "centre", "bottom", "the", "at"]
    tok = build_clip_tokenizer(words)
    for w in words:
        assert tok.tokenize(w) == [w + "</w>"], (w, tok.tokenize(w))
    ids = tok("a red triangle at the top right").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 2 + 7
    assert tok.unk_token_id not in tok("zebra 42").input_ids[1:-1]  # unknown words fall back to characters


def _forward_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def test_mid_vae_weighs_like_sd15_against_its_unet():
    """bench --arch mid times the official per-step VAE encoding: its VAE must cost the same share of a UNet
    forward as SD 1.5's VAE does (counted on the meta device: no memory, no compute)."""
    import torch

    from diffusion_dpo.models.build import build_unet, build_vae, vae_downsampling

    ratios = {}
    for arch, latent, ctx in (("sd15", 64, 768), ("mid", 32, 256)):
        with torch.device("meta"):
            unet = build_unet("sd", arch, sample_size=latent)
            vae = build_vae(arch, sample_size=latent * vae_downsampling(arch))
            x, e, t = torch.empty(1, 4, latent, latent), torch.empty(1, 77, ctx), torch.zeros(1, dtype=torch.long)
            image = torch.empty(1, 3, latent * vae_downsampling(arch), latent * vae_downsampling(arch))
        assert 2 ** (len(vae.config.block_out_channels) - 1) == vae_downsampling(arch) == 8
        ratios[arch] = _forward_flops(lambda: vae.encode(image)) / _forward_flops(lambda: unet(x, t, e))
    assert abs(ratios["mid"] / ratios["sd15"] - 1) < 0.05, ratios
    assert 1.2 < ratios["sd15"] < 1.6, ratios
