"""ImageReward (Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for Text-to-Image
Generation"): a BLIP ViT-L/16 image encoder, a BERT text encoder whose every layer cross-attends to the
image tokens, and an MLP head on the text [CLS] state.

    reward = load_reward("imagereward")                        # hub THUDM/ImageReward: ImageReward.pt + med_config.json
    reward = load_reward("imagereward=/models/ImageReward")    # a folder holding both (or the .pt; med_config= option)

Score = (mlp(cls) - 0.16717362830052426) / 1.0333394966054072, the reference's standardisation (papers report
this number). The prompt is tokenized by BERT's uncased WordPiece, padded/truncated to 35 tokens; the image
goes through the reference's torchvision transform (reproduced in `blip_pixels`).

The checkpoint is read as tensors only (torch.load(weights_only=True) or safetensors) and renamed into
transformers' BlipVisionModel and BlipTextModel (`imagereward_to_transformers`); the ImageReward package
(incompatible with transformers 5) is not needed. The whole forward was checked against the reference
package on a small random-weight model: tests/fixtures/imagereward, written by
scripts/imagereward_reference_fixture.py, and tests/unit/evaluate/test_imagereward.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from diffusion_dpo.errors import ModelLoadError
from diffusion_dpo.evaluate.rewards.base import CLIP_MEAN, CLIP_STD, RewardModel
from diffusion_dpo.evaluate.rewards.clip import AestheticMLP
from diffusion_dpo.evaluate.rewards.hub import device_dtype, fetch_file, from_pretrained, load_state_dict

# ImageReward/ImageReward.py: rewards = (rewards - self.mean) / self.std
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_TOKENS = 35  # the reference tokenizes with max_length=35

DEFAULT_REPO = "THUDM/ImageReward"
# The reference: BertTokenizer.from_pretrained("bert-base-uncased") plus [DEC] (bos) and [ENC] (BLIP's
# init_tokenizer); the checkpoint's 30524-token embedding has rows for both.
DEFAULT_TOKENIZER = "google-bert/bert-base-uncased"

# BLIP's create_vit("large", 224) (ImageReward hard-codes it): ViT-L/16, qkv with bias, exact GELU,
# LayerNorm eps 1e-6, a final LayerNorm; no pre-LayerNorm, so BlipVisionModel has the same layout.
VIT_L_16 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
            "image_size": 224, "patch_size": 16, "hidden_act": "gelu", "layer_norm_eps": 1e-6}

_VIT_TOP = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
            "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
            "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
            "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
_VIT_BLOCK = {"norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
              "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
# BLIP's contrastive projections (ITC) and BERT's position-id buffer: in the checkpoint, unused by the score.
_UNUSED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")


def imagereward_to_transformers(sd: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """Split an ImageReward state dict into (BlipVisionModel, BlipTextModel, MLP head) state dicts.

    blip.visual_encoder.* (BLIP's timm-style ViT) is renamed; blip.text_encoder.* (BLIP's med.py BERT)
    already has BlipTextModel's layout (transformers ported it from med.py); mlp.layers.* is the
    aesthetic-predictor-shaped head. Unknown keys raise, so a different checkpoint is never half-loaded.
    """
    vision: dict[str, torch.Tensor] = {}
    text: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.startswith(_UNUSED):
            continue
        if key.startswith("blip.visual_encoder."):
            rest = key.removeprefix("blip.visual_encoder.")
            if rest in _VIT_TOP:
                vision[_VIT_TOP[rest]] = value
                continue
            if rest.startswith("blocks."):
                index, tail = rest.removeprefix("blocks.").split(".", 1)
                module, param = tail.rsplit(".", 1)
                if module in _VIT_BLOCK:
                    vision[f"encoder.layers.{index}.{_VIT_BLOCK[module]}.{param}"] = value
                    continue
        elif key.startswith("blip.text_encoder."):
            text[key.removeprefix("blip.text_encoder.")] = value
            continue
        elif key.startswith("mlp.layers."):
            head[key.removeprefix("mlp.")] = value
            continue
        raise ModelLoadError(f"ImageReward checkpoint key {key!r} has no counterpart (expected blip.visual_encoder.*, "
                             f"blip.text_encoder.*, mlp.layers.*): not an ImageReward state dict")
    return vision, text, head


def blip_pixels(images: list, size: int) -> torch.Tensor:
    """The reference's preprocessing for PIL images, without torchvision: Resize(size, BICUBIC) (shortest
    side to `size`, the other side truncated, int(size * long / short), as torchvision computes it),
    CenterCrop(size) (offsets int(round((new - size) / 2)), Python's half-to-even round, as torchvision),
    ToTensor (/255), Normalize(CLIP_MEAN, CLIP_STD) (BLIP's normalisation is OpenAI CLIP's).
    Returns (N, 3, size, size) float32."""
    import numpy as np
    from PIL import Image

    out = []
    for im in images:
        w, h = im.size
        new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        if (new_w, new_h) != (w, h):
            im = im.resize((new_w, new_h), Image.BICUBIC)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        im = im.crop((left, top, left + size, top + size)).convert("RGB")
        out.append(torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).float().div(255))
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    return (torch.stack(out) - mean) / std


def _text_config(med_config: Path, vision_width: int) -> Any:
    """BlipTextConfig from BLIP's med_config.json (a BertConfig); cross-attention keys/values read the
    vision width (the reference sets encoder_width = vision_width after reading the file)."""
    from transformers import BlipTextConfig

    try:
        med = json.loads(med_config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"cannot read ImageReward med_config {med_config}: {type(err).__name__}: {err}") from err
    if not isinstance(med, dict) or not med.get("add_cross_attention"):
        raise ModelLoadError(f"{med_config}: not an ImageReward/BLIP med_config (needs \"add_cross_attention\": true)")
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "hidden_act", "layer_norm_eps", "pad_token_id")
    missing = [k for k in keys if k not in med]
    if missing:
        raise ModelLoadError(f"{med_config}: missing {', '.join(missing)}")
    # is_decoder=True only makes BlipTextModel build the cross-attention layers; the forward runs with
    # is_decoder=False (bidirectional self-attention), as med.py's BertModel does by default.
    # Special-token ids only serve generation, which a scorer never runs.
    return BlipTextConfig(**{k: med[k] for k in keys}, encoder_hidden_size=vision_width, is_decoder=True,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, bos_token_id=None,
                          eos_token_id=None, sep_token_id=None)


def _load_into(module: torch.nn.Module, sd: dict, what: str, weights: Path) -> None:
    try:
        missing, unexpected = module.load_state_dict(sd, strict=False)
    except RuntimeError as err:  # shape mismatches
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise ModelLoadError(f"{weights}: does not fit the {what}: {lines[1] if len(lines) > 1 else lines[0]}") from err
    if missing or unexpected:
        raise ModelLoadError(f"{weights}: does not fit the {what}: missing {missing[:3]}, unexpected {unexpected[:3]}")


class ImageReward(RewardModel):
    """ImageReward v1.0 behind the reward protocol. Options: `med_config` (path to the BERT config; default:
    med_config.json next to the checkpoint or in the same hub repo), `tokenizer` (a BERT uncased tokenizer
    folder or hub id; default: the checkpoint's folder if it holds vocab.txt or tokenizer.json, else
    google-bert/bert-base-uncased), `vision_config` (the ViT's size; default ViT-L/16 at 224 px as the
    reference hard-codes; tests use a small one)."""

    def __init__(self, source: str | None = None, device="cpu", dtype=torch.float32, med_config: str | None = None,
                 tokenizer: str | None = None, vision_config: dict | None = None, batch_size: int = 16):
        from transformers import BertTokenizer, BlipTextModel, BlipVisionConfig, BlipVisionModel

        device, dtype = device_dtype(device, dtype)
        source = source or DEFAULT_REPO
        self.name = "imagereward"
        flag = "--metric imagereward=PATH"
        suffixes = (".pt", ".pth", ".bin", ".safetensors")
        weights = fetch_file(source, "ImageReward.pt", "ImageReward checkpoint", flag, suffixes)
        config_path = self._med_config(source, weights, med_config, suffixes)
        vision_sd, text_sd, head_sd = imagereward_to_transformers(load_state_dict(weights))

        arch = "custom (test) ViT" if vision_config else "BLIP ViT-L/16"
        vision_cfg = BlipVisionConfig(**{**VIT_L_16, **(vision_config or {})})
        cls_token = vision_sd.get("embeddings.class_embedding")
        width = None if cls_token is None else cls_token.shape[-1]
        depth = len({k.split(".")[2] for k in vision_sd if k.startswith("encoder.layers.")})
        if (width, depth) != (vision_cfg.hidden_size, vision_cfg.num_hidden_layers):
            # checked before building the model: a ViT-L takes seconds to initialise
            raise ModelLoadError(f"{weights}: does not fit the {arch}: the checkpoint's ViT has width {width} and "
                                 f"{depth} layers, the {arch} {vision_cfg.hidden_size} and "
                                 f"{vision_cfg.num_hidden_layers}")
        self.vision = BlipVisionModel(vision_cfg)
        _load_into(self.vision, vision_sd, arch, weights)
        self.text = BlipTextModel(_text_config(config_path, vision_cfg.hidden_size), add_pooling_layer=False)
        _load_into(self.text, text_sd, f"BERT of {config_path}", weights)
        if "layers.0.weight" not in head_sd:
            raise ModelLoadError(f"{weights}: no MLP head (mlp.layers.0.weight): not an ImageReward checkpoint")
        self.mlp = AestheticMLP(head_sd["layers.0.weight"].shape[1])  # the same 5-linear head, other weights
        _load_into(self.mlp, head_sd, "ImageReward MLP head", weights)
        self.vision.to(device=device, dtype=dtype).eval()
        self.text.to(device=device, dtype=dtype).eval()
        self.mlp.to(device=device, dtype=torch.float32).eval()  # the reference casts the [CLS] state to float

        # A folder holding the checkpoint and BERT's vocab.txt needs no hub access for the tokenizer either.
        local_tok = any((weights.parent / f).is_file() for f in ("vocab.txt", "tokenizer.json"))
        tok_source = tokenizer or (str(weights.parent) if local_tok else DEFAULT_TOKENIZER)
        self.tokenizer = from_pretrained(BertTokenizer, tok_source, "ImageReward tokenizer (BERT uncased)",
                                          "--metric-option imagereward.tokenizer=PATH")
        # as BLIP's init_tokenizer (ids 30522 and 30523 in the release); only a prompt that spells them out uses them
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
        if len(self.tokenizer) > self.text.config.vocab_size:
            raise ModelLoadError(f"ImageReward tokenizer {tok_source}: {len(self.tokenizer)} tokens but the checkpoint "
                                 f"embeds {self.text.config.vocab_size}; pass the bert-base-uncased tokenizer")
        self.image_size = vision_cfg.image_size
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self.info = {"metric": "imagereward", "model": f"{source} ({weights.name})",
                     "version": "ImageReward v1.0" if source == DEFAULT_REPO else "custom ImageReward weights",
                     "architecture": f"{arch} + BERT cross-encoder ({config_path.name}) + MLP head",
                     "scale": f"(mlp - {REWARD_MEAN}) / {REWARD_STD} (reference standardisation; about -2..2, "
                              f"papers report the mean)",
                     "preprocessing": f"resize shortest side {self.image_size} bicubic (long side truncated), center "
                                      f"crop, BLIP/CLIP mean/std; BERT uncased WordPiece, {MAX_TOKENS} tokens"}

    @staticmethod
    def _med_config(source: str, weights: Path, given: str | None, suffixes: tuple[str, ...]) -> Path:
        flag = "--metric-option imagereward.med_config=PATH"
        if given:
            path = Path(given).expanduser()
            if not path.is_file():
                raise ModelLoadError(f"ImageReward med_config: {given!r} is not a file; pass it with {flag}")
            return path
        if (weights.parent / "med_config.json").is_file():  # a local folder, or the hub snapshot already fetched
            return weights.parent / "med_config.json"
        if Path(source).expanduser().exists() or source.startswith(("http://", "https://")):
            raise ModelLoadError(f"ImageReward: no med_config.json next to {weights}; pass it with {flag}")
        repo = source.rsplit("/", 1)[0] if source.endswith(suffixes) and source.count("/") >= 2 else source
        return fetch_file(repo, "med_config.json", "ImageReward med_config", flag, (".json",))

    @torch.no_grad()
    def _score_batch(self, images, prompts):
        pixels = blip_pixels(images, self.image_size).to(self.device, self.dtype)
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS,
                             return_tensors="pt")
        image_tokens = self.vision(pixel_values=pixels).last_hidden_state
        # every image token is attended (the reference's all-ones encoder_attention_mask)
        states = self.text(input_ids=tok["input_ids"].to(self.device),
                           attention_mask=tok["attention_mask"].to(self.device),
                           encoder_hidden_states=image_tokens, is_decoder=False).last_hidden_state
        return ((self.mlp(states[:, 0].float()) - REWARD_MEAN) / REWARD_STD).squeeze(-1)
