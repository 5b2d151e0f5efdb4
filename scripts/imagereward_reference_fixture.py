"""Write tests/fixtures/imagereward/: a small random-weight ImageReward built and run by the REFERENCE code.

The fixture pins our implementation (src/diffusion_dpo/evaluate/rewards/imagereward.py) to the reference forward:
tests/unit/evaluate/test_imagereward.py loads the reference state dict written here (the reference's own
key names) through our key map and must reproduce the reference's `ImageReward.score(prompt, image)`,
its tokenization and its preprocessing.

What runs here is the PyPI package `image-reward` 1.5 (THUDM/ImageReward), unmodified, with three
substitutions that only shrink the model or replace network access:
  * `create_vit` -> the reference's own `VisionTransformer` with 2 layers of width 32 (still 224 px,
    patch 16, so the reference's 224-px preprocessing runs unchanged);
  * `BertTokenizer.from_pretrained("bert-base-uncased")` -> a BertTokenizer on the small vocabulary
    below (the reference's `init_tokenizer` still adds [DEC] and [ENC]);
  * `med_config.json` -> a small BERT config (2 layers, width 32) and the MLP head -> the reference's
    `MLP` on width 32 (the reference hard-codes 768).
All weights are then redrawn from a fixed seed (scales chosen so every layer matters), and the reference
scores each (prompt, image) pair with `ImageReward.score`, one pair at a time as it does.

It cannot run in the project's venv (image-reward needs transformers 4.x, timm 0.6, fairscale). Regenerate:

    python3 -m venv /tmp/irvenv
    /tmp/irvenv/bin/pip install torch==2.13.0   # CPU wheel (here a local one; elsewhere --index-url .../whl/cpu)
    /tmp/irvenv/bin/pip install --no-deps torchvision==0.28.0 timm==0.6.13 image-reward==1.5
    /tmp/irvenv/bin/pip install --no-deps --no-build-isolation fairscale==0.4.13
    /tmp/irvenv/bin/pip install transformers==4.36.2 pillow safetensors "numpy<2"
    /tmp/irvenv/bin/python scripts/imagereward_reference_fixture.py  # writes tests/fixtures/imagereward/

The package's __init__ files (ReFL trainer, CLIP and aesthetic scorers) are bypassed; see
_import_package_without_init. The torchvision wheel on PyPI is a CUDA build whose C extension does not
load beside the CPU torch; its import then fails while registering fake kernels for two detection ops.
Only the PIL transforms are used here, so the two op schemas are declared (never executed) before
importing torchvision when needed. The output is deterministic: rerunning rewrites identical files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "imagereward"
SEED = 0
WIDTH, LAYERS, HEADS = 32, 2, 2
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "the", "of", "on", "in", "photo", "red", "blue",
         "cat", "dog", "beach", "style", "cafe", "sit", "paint", "##s", "##ing", ",", ".", "!"]
PROMPTS = ["a photo of a red cat",
           "Dogs sitting on the BEACH, in the style of a painting!",  # case, word pieces, punctuation
           "Café.",  # accent stripped by the uncased tokenizer
           " ".join(["a red cat"] * 14),  # 42 words: truncated to 35 tokens
           "zebra",  # out of vocabulary -> [UNK]
           ""]


def _declare_torchvision_ops() -> None:
    """Let `import torchvision` succeed when its CUDA-built extension cannot load (see module docstring)."""
    try:
        torch.ops.torchvision.nms  # noqa: B018
    except (AttributeError, RuntimeError):
        lib = torch.library.Library("torchvision", "DEF")  # kept alive for the process (module global)
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        globals()["_TV_LIB"] = lib


def _import_package_without_init() -> None:
    """Register the `ImageReward` package without running its __init__, which imports the ReFL trainer
    (diffusers, accelerate, datasets) and the openai `clip` package; the scorer's modules need none of them."""
    import importlib.util
    import types

    spec = importlib.util.find_spec("ImageReward")
    pkg = types.ModuleType("ImageReward")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__file__ = spec.origin
    sys.modules["ImageReward"] = pkg
    models = types.ModuleType("ImageReward.models")  # models/__init__ imports the CLIP/aesthetic scorers
    models.__path__ = [str(Path(pkg.__path__[0]) / "models")]
    sys.modules["ImageReward.models"] = models


def _images():
    """Sizes chosen so the reference's resize truncates where round() would not (48x64: long side 298.67
    -> 298), its center crop rounds half to even where floor would not (62x40: offset 61.5 -> 62), an image
    that needs no resize (224x224), a downscale (256x240) and a grayscale image (converted after resizing
    by the reference, before by us: identical for "L")."""
    from PIL import Image

    g = torch.Generator().manual_seed(SEED + 1)

    def noise(w, h, mode="RGB", up=1):
        c = 3 if mode == "RGB" else 1
        a = (torch.rand(h, w, c, generator=g) * 255).to(torch.uint8).numpy()
        im = Image.fromarray(a[:, :, 0] if c == 1 else a, mode)
        return im.resize((w * up, h * up), Image.NEAREST) if up > 1 else im  # blocky: small PNGs

    return {"portrait_48x64.png": noise(48, 64), "landscape_62x40.png": noise(62, 40),
            "square_224.png": noise(28, 28, up=8), "down_256x240.png": noise(64, 60, up=4),
            "gray_50x70.png": noise(50, 70, mode="L")}


PAIRS = [(0, "portrait_48x64.png"), (1, "landscape_62x40.png"), (2, "square_224.png"), (3, "down_256x240.png"),
         (4, "gray_50x70.png"), (5, "portrait_48x64.png"), (0, "landscape_62x40.png")]


# Parameters that write into the ViT's residual stream: scaled by 1e-3 so that every LayerNorm of the ViT
# sees inputs of variance about 1e-6, where its epsilon (1e-6 in BLIP's ViT, 1e-5 in transformers' default)
# changes the output; at O(1) activations a wrong epsilon would hide below the test's tolerance.
VIT_RESIDUAL = ("cls_token", "pos_embed", "patch_embed.proj.", "attn.proj.", "mlp.fc2.")


def _randomize(model: torch.nn.Module) -> None:
    """Redraw every parameter: matrices ~ N(0, 1/fan_in) (keeps activations O(1) through the linear MLP
    head), LayerNorm weights 1 + N(0, 0.1), biases N(0, 0.1), class/position embeddings N(0, 0.5); the
    ViT's residual-stream writers (VIT_RESIDUAL) 1000 times smaller."""
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith(("cls_token", "pos_embed")):
                p.copy_(0.5 * r)
            elif p.ndim >= 2:
                p.copy_(r / p[0].numel() ** 0.5)
            elif "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1 + 0.1 * r)
            else:
                p.copy_(0.1 * r)
            if name.startswith("blip.visual_encoder.") and any(part in name for part in VIT_RESIDUAL):
                p.mul_(1e-3)


def main() -> int:
    _declare_torchvision_ops()
    _import_package_without_init()
    import ImageReward.ImageReward as ir_module
    import transformers
    from ImageReward.ImageReward import MLP, ImageReward
    from ImageReward.models.BLIP import blip, blip_pretrain
    from ImageReward.models.BLIP.vit import VisionTransformer
    from safetensors.torch import save_file

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "images").mkdir(exist_ok=True)
    vocab_file = OUT / "vocab.txt"
    vocab_file.write_text("\n".join(VOCAB) + "\n")

    class LocalBertTokenizer(transformers.BertTokenizer):
        @classmethod
        def from_pretrained(cls, *args, **kwargs):  # the reference asks for the hub's bert-base-uncased
            return cls(str(vocab_file))

    blip.BertTokenizer = LocalBertTokenizer  # looked up when the reference's init_tokenizer runs

    def small_vit(vit, image_size, *args):
        assert vit == "large" and image_size == 224
        return VisionTransformer(img_size=224, patch_size=16, embed_dim=WIDTH, depth=LAYERS, num_heads=HEADS,
                                 drop_path_rate=0.1), WIDTH

    blip_pretrain.create_vit = small_vit
    med_config = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
                  "hidden_dropout_prob": 0.1, "hidden_size": WIDTH, "initializer_range": 0.02,
                  "intermediate_size": 2 * WIDTH, "layer_norm_eps": 1e-12, "max_position_embeddings": 40,
                  "model_type": "bert", "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "pad_token_id": 0,
                  "type_vocab_size": 2, "vocab_size": len(VOCAB) + 2, "encoder_width": WIDTH,
                  "add_cross_attention": True}
    (OUT / "med_config.json").write_text(json.dumps(med_config, indent=2) + "\n")

    model = ImageReward(med_config=str(OUT / "med_config.json"), device="cpu")
    model.mlp = MLP(WIDTH)
    _randomize(model)
    model.eval()

    images = _images()
    for name, im in images.items():
        im.save(OUT / "images" / name)
    from PIL import Image

    loaded = {name: Image.open(OUT / "images" / name) for name in images}  # score what the test will read
    with torch.no_grad():
        scores = [model.score(PROMPTS[p], loaded[name]) for p, name in PAIRS]
        tok = model.blip.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35,
                                   return_tensors="pt")
        pixels = {name: model.preprocess(im) for name, im in loaded.items()}
    # Row and column sums of each preprocessed image: pins resize size, crop offset and normalisation
    # without storing 224x224 tensors.
    sums = {}
    for name, x in pixels.items():
        sums[f"{name}.rows"], sums[f"{name}.cols"] = x.sum(2).contiguous(), x.sum(1).contiguous()
    save_file(sums, str(OUT / "pixel_sums.safetensors"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(OUT / "ImageReward.safetensors"))
    expected = {
        "generated_by": "scripts/imagereward_reference_fixture.py",
        "reference": {"image-reward": "1.5", "transformers": transformers.__version__, "torch": torch.__version__,
                      "module": ir_module.__file__.split("site-packages/")[-1]},
        "arch": {"vision": {"hidden_size": WIDTH, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
                            "intermediate_size": 4 * WIDTH, "image_size": 224, "patch_size": 16}},
        "prompts": PROMPTS,
        "pairs": [{"prompt": p, "image": name, "score": s} for (p, name), s in zip(PAIRS, scores)],
        "input_ids": tok["input_ids"].tolist(),
        "attention_mask": tok["attention_mask"].tolist(),
    }
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(f"wrote {OUT}: scores {[round(s, 4) for s in scores]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
