"""`sample` (and `evaluate`, which samples through the same code) on tuned models: the same seeds as the base,
so a tuned model with the base's exact weights draws the base's images byte for byte; bad prompt files."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from diffusion_dpo.cli import main

sys.path.insert(0, str(Path(__file__).parents[1] / "unit" / "feedback"))  # feedback_test_rewards
FAST = ["--steps", "2", "--resolution", "32", "--images-per-prompt", "2", "--quiet"]


@pytest.fixture(scope="module")
def identical_models(tiny_sd, tmp_path_factory):
    """A copy of the base UNet (--unet) and a LoRA whose B matrices are zero (what peft initialises, before
    any training step): both compute exactly the base's function."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict

    root = tmp_path_factory.mktemp("identical")
    UNet2DConditionModel.from_pretrained(tiny_sd / "unet").save_pretrained(root / "unet_copy")
    unet = UNet2DConditionModel.from_pretrained(tiny_sd / "unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    lora = get_peft_model_state_dict(unet)
    assert all(v.abs().sum() == 0 for k, v in lora.items() if "lora_B" in k)
    assert all(v.abs().sum() > 0 for k, v in lora.items() if "lora_A" in k)  # a real adapter, not an empty one
    StableDiffusionPipeline.save_lora_weights(root / "lora_zero", unet_lora_layers=lora)
    prompts = root / "prompts.txt"
    prompts.write_text("a red cat\na blue square\n")
    return root, prompts


def _images(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.png"))}


def test_identical_tuned_models_draw_the_base_images(tiny_sd, identical_models, tmp_path):
    root, prompts = identical_models
    out = tmp_path / "samples"
    for extra in ([], ["--unet", str(root / "unet_copy")], ["--lora", str(root / "lora_zero")]):
        assert main(["sample", "--base", str(tiny_sd), *extra, "--out", str(out), "--prompts", str(prompts),
                     *FAST]) == 0
    base = _images(out / "base")
    assert len(base) == 4 and len(set(base.values())) == 4  # 2 prompts x 2 seeds: 4 distinct images
    assert _images(out / "unet_copy") == base
    assert _images(out / "lora_zero") == base
    # evaluate samples every model itself (base and each --tuned) before scoring: the same seeds again
    report = tmp_path / "report"
    assert main(["evaluate", "--base", str(tiny_sd), "--tuned", f"copy={root / 'unet_copy'}",
                 "--tuned", f"zero={root / 'lora_zero'}", "--prompts", str(prompts), *FAST, "--out", str(report),
                 "--metrics", "feedback_test_rewards:brightness", "--bootstrap", "10"]) == 0
    for name in ("base", "copy", "zero"):
        assert _images(report / "samples" / name) == base


@pytest.mark.parametrize("command", ["sample", "generate-pairs", "evaluate"])
@pytest.mark.fault(input="prompt file that is not UTF-8 (`sample`, `generate-pairs`, `evaluate`)",
                   behaviour="exit 2: names the file, line and byte; asks for UTF-8")
def test_non_utf8_prompt_file_is_one_line(command, tiny_sd, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a caf\u00e9 at night\n".encode("latin-1"))  # é as the single byte 0xe9
    args = {"sample": ["--base", str(tiny_sd), "--out", str(tmp_path / "s")],
            "generate-pairs": ["--base", str(tiny_sd), "--out", str(tmp_path / "g"),
                               "--reward", "feedback_test_rewards:brightness"],
            "evaluate": ["--base", str(tiny_sd), "--out", str(tmp_path / "e"),
                         "--metrics", "feedback_test_rewards:brightness"]}[command]
    assert main([command, *args, "--prompts", str(prompts), "--steps", "2", "--resolution", "32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert str(prompts) in err and "UTF-8" in err and "line 1, byte 5" in err
