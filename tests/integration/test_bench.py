"""`diffusion-dpo bench --arch tiny` end to end (a smoke test: no timing assertions)."""

from __future__ import annotations

import json
import re

import pytest

from diffusion_dpo.cli import main


def test_bench_tiny_runs_every_variant(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--arch", "tiny", "--steps", "1", "--warmup", "1", "--threads", "1",
                 "--workdir", str(tmp_path / "work"), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for line in ("(a) ours", "(b) ours", "(c) official", "(d) bare minimum", "a/c pairs/s", "a/d pairs/s",
                 "a/b peak memory", "(p) prepare once", "prepare / in-step encoding per pair:", "break-even passes:"):
        assert line in text
    results = json.loads(out.read_text())
    assert sorted(results["results"]) == ["a", "b", "c", "d", "e", "f", "p"]
    for v in "abcdef":
        r = results["results"][v]
        assert r["pairs_per_s"] > 0 and r["peak_mem_mb"] > 0 and r["gflop_per_step"] > 0
    # (e) cached and (f) no reference run no reference forward: (a)'s FLOPs minus one forward of 2B images
    flops = {v: results["results"][v]["gflop_per_step"] for v in "adef"}
    assert flops["e"] == pytest.approx(flops["f"], rel=1e-3)
    # LoRA: frozen weights, so the backward computes input gradients only, about one forward: a = 3 forwards, e = 2
    assert flops["a"] - flops["e"] == pytest.approx(flops["a"] / 3, rel=0.1)
    for line in ("(e) ours: cached latents, LoRA, cached reference", "(f) ours: cached latents, LoRA, no reference",
                 "e/a pairs/s", "e/c pairs/s", "f/a pairs/s", "f/c pairs/s"):
        assert line in text

    # prepare's cost and the break-even number of passes = prepare s/pair / in-step s/pair saved
    p = results["results"]["p"]
    assert p["prepare_batch_size"] == 1  # prepare's CPU default
    assert p["prepare_s_per_pair"] > 0 and p["instep_s_per_pair"] > p["cached_s_per_pair"] > 0
    parts = p["prepare_parts"]
    assert parts["images"] + parts["vae"] + parts["text"] + parts["write"] <= parts["total"]
    passes = p["prepare_s_per_pair"] / (p["instep_s_per_pair"] - p["cached_s_per_pair"])
    assert results["ratios"]["break-even passes"] == pytest.approx(passes)
    assert re.search(rf"break-even passes: {passes:.2f} \(prepare {p['prepare_s_per_pair']:.3f} s/pair", text)

    # parameter counts come from the models themselves: compare with the saved networks loaded for real
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    (model,) = (tmp_path / "work").glob("model-tiny-*")
    loaded = {"UNet": UNet2DConditionModel.from_pretrained(model, subfolder="unet"),
              "VAE": AutoencoderKL.from_pretrained(model, subfolder="vae"),
              "text encoder": CLIPTextModel.from_pretrained(model, subfolder="text_encoder")}
    expected = {name: sum(t.numel() for t in net.parameters()) for name, net in loaded.items()}
    assert results["parameters"] == expected
    unet_k = f"{expected['UNet'] / 1e3:.1f}k"  # the tiny UNet has under a million parameters
    assert f"parameters (counted on the models): UNet {unet_k}, VAE " in text


@pytest.mark.fault(input="`bench --prepare-batch-size 0`", behaviour="exit 2: `--prepare-batch-size must be >= 1`")
def test_bench_refuses_a_prepare_batch_size_below_one(tmp_path, capsys):
    assert main(["bench", "--arch", "tiny", "--prepare-batch-size", "0", "--workdir", str(tmp_path)]) == 2
    assert "--prepare-batch-size must be >= 1, got 0" in capsys.readouterr().err


def test_bench_gradient_checkpointing_counts_model_and_recomputed_flops(tmp_path, capsys):
    """The GPU recipe's flags (sdxl: LoRA + gradient checkpointing, bf16, channels_last) run on CPU too; MFU
    must count model FLOPs, so the recomputed forward is reported separately and only there."""
    runs = {}
    for name, extra in (("plain", []), ("ckpt", ["--gradient-checkpointing"])):
        out = tmp_path / f"{name}.json"
        assert main(["bench", "--arch", "tiny", "--steps", "1", "--warmup", "1", "--threads", "1", "--variants", "ac",
                     "--mixed-precision", "bf16", "--channels-last", *extra,
                     "--workdir", str(tmp_path / "work"), "--json", str(out)]) == 0
        runs[name] = json.loads(out.read_text())["results"]
    assert "run with recomputation" in capsys.readouterr().out
    for v in "ac":
        plain, ckpt = runs["plain"][v], runs["ckpt"][v]
        assert plain["hw_gflop_per_step"] == plain["gflop_per_step"]
        assert abs(ckpt["gflop_per_step"] / plain["gflop_per_step"] - 1) < 1e-6  # same model FLOPs
        assert ckpt["hw_gflop_per_step"] > 1.1 * ckpt["gflop_per_step"]  # the blocks' forward ran twice


@pytest.mark.parametrize("arch,network_class", [("sd35m", "SD3Transformer2DModel"), ("flux", "FluxTransformer2DModel")])
def test_bench_flow_arch_times_the_trainer_step_of_the_real_transformer_shrunk(tmp_path, capsys, arch, network_class):
    """`bench --arch sd35m|flux` end to end through the path a GPU run takes (build_real_flow_pipeline, prepare with
    the stand-in encoders, the trainer's own step in a child), with the transformer shrunk to one layer for a CPU."""
    out = tmp_path / "bench.json"
    work = tmp_path / "work"
    assert main(["bench", "--arch", arch, "--shrink", "--resolution", "64", "--steps", "1", "--warmup", "1",
                 "--threads", "1", "--variants", "af", "--workdir", str(work), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert sorted(results["results"]) == ["a", "f"]
    for v in "af":
        r = results["results"][v]
        assert r["pairs_per_s"] > 0 and r["peak_mem_mb"] > 0 and r["gflop_per_step"] > 0
        assert r["s_per_step"] > 0 and r["pairs_per_s"] == pytest.approx(2 / r["s_per_step"])
    # no reference in (f): a's FLOPs are one reference forward more
    flops = {v: results["results"][v]["gflop_per_step"] for v in "af"}
    assert flops["a"] > 1.3 * flops["f"]
    assert "stand-ins with the real output shapes" in text and "(a) ours: cached latents, LoRA" in text
    # the saved pipeline holds the real transformer class, counted under the name 'transformer'
    (model,) = work.glob(f"model-{arch}-shrunk-*")
    assert json.loads((model / "model_index.json").read_text())["transformer"][1] == network_class
    from safetensors import safe_open

    (weights,) = (model / "transformer").glob("*.safetensors")
    with safe_open(str(weights), "pt") as f:  # saved in bf16, as the published checkpoints
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert results["parameters"]["transformer"] > 0 and "text encoder 2" in results["parameters"]
    assert "parameters (counted on the models): transformer " in text


@pytest.mark.fault(input="`bench --arch sd35m --variants c` (or d, p: UNet-only variants)",
                   behaviour="exit 2: `--variants: c, d and p time UNet pipelines ...; use letters from 'abef'`")
def test_bench_flow_arch_refuses_the_unet_only_variants(tmp_path, capsys):
    for v in "cdp":
        assert main(["bench", "--arch", "sd35m", "--variants", f"a{v}", "--workdir", str(tmp_path)]) == 2
        assert "use letters from 'abef'" in capsys.readouterr().err


@pytest.mark.fault(input="`bench --arch flux --vae sd`", behaviour="exit 2: `--vae sd: --arch flux has its own 16-channel "
                   "stand-in VAE; drop --vae`")
def test_bench_flow_arch_refuses_another_vae(tmp_path, capsys):
    assert main(["bench", "--arch", "flux", "--vae", "sd", "--workdir", str(tmp_path)]) == 2
    assert "--vae sd: --arch flux has its own 16-channel stand-in VAE" in capsys.readouterr().err


@pytest.mark.fault(input="`bench --arch mid --shrink` (the test-only flag on a UNet arch)",
                   behaviour="exit 2: `--shrink reduces a flow transformer (--arch sd35m, sd35l, flux); drop it`")
def test_bench_shrink_is_for_the_flow_archs_only(tmp_path, capsys):
    assert main(["bench", "--arch", "mid", "--shrink", "--workdir", str(tmp_path)]) == 2
    assert "--shrink reduces a flow transformer" in capsys.readouterr().err
