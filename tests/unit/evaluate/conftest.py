"""Tiny random-weight reward models of the real architectures, saved to temp folders, so every scorer
is exercised through its real loading code. Nothing touches the network."""

from __future__ import annotations

import pytest
import torch

TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   image_size=32, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-5)


def tiny_clip_config(vocab_size: int, projection_dim: int = 768):
    from transformers import CLIPConfig

    return CLIPConfig(text_config=dict(TINY_TEXT, vocab_size=vocab_size, bos_token_id=vocab_size - 2,
                                       eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1),
                      vision_config=TINY_VISION, projection_dim=projection_dim)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A CLIPModel (projection 768, like ViT-L/14, so the aesthetic head fits) + CLIPProcessor folder."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

    from diffusion_dpo.models.build import build_clip_tokenizer

    torch.manual_seed(0)
    tok = build_clip_tokenizer(["a", "red", "cat", "dog", "photo", "of"])
    path = tmp_path_factory.mktemp("tiny_clip")
    model = CLIPModel(tiny_clip_config(len(tok) + 2))
    model.config.text_config.eos_token_id = tok.eos_token_id
    model.config.text_config.bos_token_id = tok.bos_token_id
    model.save_pretrained(path)
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}), tokenizer=tok)
    proc.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_aesthetic_pth(tmp_path_factory):
    from diffusion_dpo.evaluate.rewards import AestheticMLP

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("aesthetic") / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(AestheticMLP(768).state_dict(), path)
    return path


def transformers_to_open_clip(sd: dict) -> dict:
    """Inverse of rewards.open_clip_to_transformers, to write a tiny checkpoint in open_clip's key layout."""
    out = {}
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue
        for tower, prefix in (("vision_model.encoder.layers.", "visual.transformer.resblocks."),
                              ("text_model.encoder.layers.", "transformer.resblocks.")):
            if k.startswith(tower):
                i, rest = k.removeprefix(tower).split(".", 1)
                if rest.startswith("self_attn.q_proj."):
                    kind = rest.rsplit(".", 1)[-1]
                    parts = [sd[f"{tower}{i}.self_attn.{n}.{kind}"] for n in ("q_proj", "k_proj", "v_proj")]
                    out[f"{prefix}{i}.attn.in_proj_{kind}"] = torch.cat(parts)
                elif rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
                    pass
                else:
                    for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                                 ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                        rest = rest.replace(a, b)
                    out[f"{prefix}{i}.{rest}"] = v
                break
        else:
            mapping = {"vision_model.embeddings.class_embedding": "visual.class_embedding",
                       "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
                       "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
                       "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
                       "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
                       "vision_model.post_layernorm.weight": "visual.ln_post.weight",
                       "vision_model.post_layernorm.bias": "visual.ln_post.bias",
                       "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                       "text_model.embeddings.position_embedding.weight": "positional_embedding",
                       "text_model.final_layer_norm.weight": "ln_final.weight",
                       "text_model.final_layer_norm.bias": "ln_final.bias", "logit_scale": "logit_scale"}
            if k in mapping:
                out[mapping[k]] = v
            elif k == "visual_projection.weight":
                out["visual.proj"] = v.t().contiguous()
            elif k == "text_projection.weight":
                out["text_projection"] = v.t().contiguous()
            else:
                raise KeyError(k)
    return out


HPS_TINY_ARCH = {"projection_dim": 24,
                 "text_config": dict(TINY_TEXT, vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=0),
                 "vision_config": TINY_VISION}


@pytest.fixture(scope="session")
def hps_tiny_arch():
    return HPS_TINY_ARCH


@pytest.fixture(scope="session")
def tiny_hps(tmp_path_factory):
    """(checkpoint path, reference CLIPModel): a tiny CLIP with the real 49,408-token vocabulary, saved in
    open_clip's key layout inside {"state_dict": ...} like the HPS release."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(2)
    model = CLIPModel(CLIPConfig(**HPS_TINY_ARCH)).eval()
    path = tmp_path_factory.mktemp("hps") / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in transformers_to_open_clip(model.state_dict()).items()}},
               path)
    return path, model


@pytest.fixture(scope="session")
def tiny_images():
    """Four distinct 40x40 RGB images."""
    from PIL import Image

    g = torch.Generator().manual_seed(3)
    return [Image.fromarray((torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(4)]
