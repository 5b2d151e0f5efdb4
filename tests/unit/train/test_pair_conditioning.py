"""Within a pair, winner and loser reach the UNet with the same conditioning (text, caption dropout, SDXL
time ids), and policy and reference see it bit for bit, whatever their dtypes."""

from __future__ import annotations

import pytest
import torch

from diffusion_dpo.config import load_config
from diffusion_dpo.data.synthetic import write_manifest
from diffusion_dpo.errors import DataError
from diffusion_dpo.models.encode import pair_time_ids
from diffusion_dpo.train.trainer import Trainer


def _trainer(tmp_path, model, source, *extra) -> Trainer:
    cfg = load_config(None, [f"model.pretrained={model}", f"data.source={source}", "data.resolution=32",
                             "output.report_to=none", f"output.dir={tmp_path / 'out'}", *extra])
    return Trainer(cfg, progress=False).setup()


def _record_unet_inputs(unet, calls: list[dict]) -> None:
    def hook(module, args, kwargs):
        calls.append({"encoder_hidden_states": kwargs["encoder_hidden_states"].detach().clone(),
                      "added_cond_kwargs": {k: v.detach().clone() for k, v in (kwargs["added_cond_kwargs"] or {}).items()}})

    unet.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sdxl"])
def test_caption_dropout_drops_winner_and_loser_together(fixture, request, tmp_path):
    """caption_dropout 0.5 over 16 pairs: each pair's two rows get identical text (and pooled) conditioning,
    some pairs the empty prompt's, some their own prompt's. A per-image draw would split some pair."""
    source = write_manifest(tmp_path / "data", n=16, size=(32, 32))
    t = _trainer(tmp_path, request.getfixturevalue(fixture), source, "data.caption_dropout=0.5", "train.batch_size=16")
    calls: list[dict] = []
    _record_unet_inputs(t.accelerator.unwrap_model(t.unet), calls)
    t.micro_step(next(iter(t.loader)))
    assert len(calls) == 2  # reference (adapters off) and policy
    empty = t.batch_encoder.empty_cond
    for call in calls:
        rows = {"encoder_hidden_states": (call["encoder_hidden_states"], empty.prompt_embeds[0])}
        if fixture == "tiny_sdxl":
            rows["text_embeds"] = (call["added_cond_kwargs"]["text_embeds"], empty.pooled_prompt_embeds[0])
        dropped = []
        for name, (x, empty_row) in rows.items():
            b = x.shape[0] // 2
            assert b == 16
            for i in range(b):
                assert torch.equal(x[i], x[b + i]), (name, i)  # winner row == loser row
            dropped.append([torch.equal(x[i], empty_row) for i in range(b)])
        assert all(d == dropped[0] for d in dropped)  # pooled and sequence embeddings dropped together
        assert 0 < sum(dropped[0]) < 16  # both outcomes occur: the test can see a split pair


def test_time_ids_reach_policy_and_bf16_reference_as_identical_float32(tmp_path, tiny_sdxl):
    # 257x300 (h, w) at 32 -> 32x37 (int(32 * 300 / 257) = int(37.35)), centre crop left round(5 / 2) = 2.
    # bfloat16 holds integers exactly only up to 256: 257 would become 256 in a bf16 reference.
    assert torch.tensor(257.0).bfloat16().float().item() == 256.0
    source = write_manifest(tmp_path / "data", n=2, size=(257, 300))
    t = _trainer(tmp_path, tiny_sdxl, source, "train.finetune=full", "model.reference_dtype=bfloat16",
                 "train.batch_size=2")
    assert next(t.reference.unet.parameters()).dtype == torch.bfloat16
    assert next(t.accelerator.unwrap_model(t.unet).parameters()).dtype == torch.float32
    policy_calls: list[dict] = []
    reference_calls: list[dict] = []
    _record_unet_inputs(t.accelerator.unwrap_model(t.unet), policy_calls)
    _record_unet_inputs(t.reference.unet, reference_calls)
    t.micro_step(next(iter(t.loader)))
    (policy,), (reference,) = policy_calls, reference_calls
    ids_policy, ids_reference = policy["added_cond_kwargs"]["time_ids"], reference["added_cond_kwargs"]["time_ids"]
    assert ids_policy.dtype == ids_reference.dtype == torch.float32
    assert torch.equal(ids_policy, ids_reference)
    assert torch.equal(ids_policy, torch.tensor([257.0, 300.0, 0.0, 2.0, 32.0, 32.0]).expand(4, 6))


def test_pair_time_ids_repeat_the_winner_row_and_image_mode_keeps_each():
    sizes = torch.tensor([[[40, 48], [40, 48]], [[600, 900], [600, 900]]])  # (B=2, winner/loser, (h, w))
    crops = torch.tensor([[[0, 3], [0, 3]], [[0, 10], [0, 10]]])
    ids = pair_time_ids(sizes, crops, 32, "pair")
    first, second = [40.0, 48.0, 0.0, 3.0, 32.0, 32.0], [600.0, 900.0, 0.0, 10.0, 32.0, 32.0]
    assert ids.dtype == torch.float32 and ids.tolist() == [first, second, first, second]
    mixed_sizes = torch.tensor([[[40, 48], [48, 40]]])
    mixed_crops = torch.tensor([[[0, 3], [3, 0]]])
    assert pair_time_ids(mixed_sizes, mixed_crops, 32, "image").tolist() == [first, [48.0, 40.0, 3.0, 0.0, 32.0, 32.0]]


def test_pair_mode_refuses_a_pair_with_two_geometries():
    """(the command-line case: tests/unit/cache/test_cache.py::test_training_refuses_a_per_image_cache_in_pair_mode)"""
    sizes = torch.tensor([[[40, 48], [40, 48]], [[40, 48], [48, 40]]])
    crops = torch.tensor([[[0, 3], [0, 3]], [[0, 3], [3, 0]]])
    with pytest.raises(DataError, match=r"pair 7: .*prepare one with 'pair' or set data.sdxl_time_ids=image"):
        pair_time_ids(sizes, crops, 32, "pair", indices=torch.tensor([4, 7]))
