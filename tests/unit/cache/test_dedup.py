"""Prompt de-duplication in the cache (format 3): each distinct prompt's text conditioning is stored once, in the
prompt table, and pairs refer to its row. What training reads is unchanged, bit for bit; the cache shrinks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from diffusion_dpo.cache import prepare as prep
from diffusion_dpo.cache.store import MANIFEST, CachedPairDataset, read_manifest, read_shard
from diffusion_dpo.cli import main
from diffusion_dpo.config import load_config
from diffusion_dpo.data.synthetic import write_manifest
from diffusion_dpo.errors import DataError
from diffusion_dpo.models.families import detect_spec
from diffusion_dpo.runtime import write_json_atomic, write_safetensors_atomic

PROMPTS = ["a red cat", "", "a photo of a blue dog"]
"""Pair i's prompt is PROMPTS[i % 3]: 4 pairs per prompt, in every shard. "" as a pair's own prompt (a caption
left empty) gets a row of its own, apart from the caption-dropout conditioning in empty_prompt.safetensors."""


@pytest.fixture(scope="module")
def repeated(tmp_path_factory) -> Path:
    """12 pairs, 3 distinct prompts."""
    path = write_manifest(tmp_path_factory.mktemp("rep"), n=12)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({**row, "prompt": PROMPTS[i % 3]}) + "\n" for i, row in enumerate(rows)))
    return path


def _cfg(model, source, cache_dir, *extra):
    return load_config(None, [f"model.pretrained={model}", f"data.source={source}", "data.resolution=32",
                              f"data.cache_dir={cache_dir}", *extra])


def _as_format_2(folder: Path, out: Path) -> Path:
    """The same cache in the per-pair layout of format 2 (each pair's text stored in its shard, no prompt table),
    as the toolkit wrote it before de-duplication."""
    out.mkdir(parents=True)
    m = read_manifest(folder)
    shutil.copy(folder / "empty_prompt.safetensors", out)
    for k, entry in enumerate(m["shards"]):
        with safe_open(str(folder / entry["file"]), "pt") as f:
            meta = f.metadata()
        write_safetensors_atomic(out / entry["file"], read_shard(folder, k), meta, sorted_header=True)
    for name in ("num_prompts", "num_prompt_shards", "prompt_shards", "bytes_per_pair_without_dedup", "pairs_per_prompt"):
        m.pop(name)
    write_json_atomic(out / MANIFEST, {**m, "format_version": 2})
    return out


def test_each_prompt_is_stored_once_and_the_cache_shrinks_by_the_expected_factor(tiny_sd, repeated, tmp_path, capsys):
    folder = prep.prepare_cache(_cfg(tiny_sd, repeated, tmp_path), storage_dtype="float16", shard_size=5,
                                progress=False)
    m = read_manifest(folder)
    assert (m["num_pairs"], m["num_shards"], m["num_prompts"], m["pairs_per_prompt"]) == (12, 3, 3, 4.0)
    # one table file of 3 rows, in order of first appearance, though each prompt has pairs in all 3 shards
    assert [e["file"] for e in m["prompt_shards"]] == ["prompts-00000.safetensors"]
    table = load_file(str(folder / "prompts-00000.safetensors"))
    with safe_open(str(folder / "prompts-00000.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["prompts"]) == PROMPTS
    assert list(table) == ["prompt_embeds"] and table["prompt_embeds"].shape == (3, 77, 32)
    index = torch.cat([load_file(str(folder / e["file"]))["prompt_index"] for e in m["shards"]])
    assert index.tolist() == [i % 3 for i in range(12)]
    assert all("prompt_embeds" not in load_file(str(folder / e["file"])) for e in m["shards"])

    # sizes, by hand: a text row is 77 x 32 float16 = 4928 bytes; stored once per prompt it costs each pair
    # 4928 / 4 = 1232 bytes plus its 8-byte prompt_index, instead of 4928
    row = 77 * 32 * 2
    assert m["prompt_shards"][0]["row_bytes"] == row
    table_bytes = m["prompt_shards"][0]["bytes"]
    assert 3 * row <= table_bytes < 3 * row + 1024  # the rows and a header
    pair_bytes = sum(e["bytes"] for e in m["shards"])
    assert m["bytes"] == pair_bytes + table_bytes
    assert m["bytes_per_pair"] == round((pair_bytes + table_bytes) / 12)
    assert m["bytes_per_pair_without_dedup"] == round((pair_bytes + 12 * (row - 8)) / 12)
    # the rest of a pair: latent mean + std of 2 images, 4 x 16 x 16 float16 (8192), source and prompt index (16),
    # sizes and crops (64): the factor per-pair text / de-duplicated is (8272 + 4928) / (8280 + 1232), up to headers
    assert m["bytes_per_pair_without_dedup"] / m["bytes_per_pair"] == pytest.approx((8272 + row) / (8280 + row / 4),
                                                                                     rel=0.03)
    out = capsys.readouterr().out
    assert (f"{m['bytes_per_pair']} bytes/pair ({m['bytes_per_pair_without_dedup']} with each pair's text stored per "
            "pair; 3 distinct prompts, 4.0 pairs per prompt)") in out


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sdxl", "tiny_lcm"])
def test_every_family_reads_each_pairs_own_encoding_bit_for_bit(fixture, request, repeated, tmp_path):
    """Every family stores its text fields (SDXL: prompt_embeds and pooled_prompt_embeds) in the table; each
    pair reads exactly what encoding its prompt alone gives, which format 2 stored with the pair (1 pair per
    encoder call, the CPU default); the pair whose prompt is "" reads the caption-dropout conditioning."""
    from diffusion_dpo.models.encode import TEXT_FIELDS

    model = request.getfixturevalue(fixture)
    cfg = _cfg(model, repeated, tmp_path)
    folder = prep.prepare_cache(cfg, storage_dtype="float32", shard_size=5, progress=False)
    spec = detect_spec(str(model))
    encoder = prep.load_encoders(cfg, spec, "cpu").prompt_encoder
    fields = sorted(encoder(["a red cat"]).tensors())
    assert fields == (sorted(TEXT_FIELDS) if fixture == "tiny_sdxl" else ["prompt_embeds"])
    assert sorted(load_file(str(folder / "prompts-00000.safetensors"))) == fields
    ds = CachedPairDataset(folder, spec, "mean", resolution=32)
    own = {p: encoder([p]).tensors() for p in PROMPTS}
    for i in range(12):
        item = ds[i]
        for name in fields:
            assert torch.equal(item[name], own[PROMPTS[i % 3]][name][0]), (i, name)
    empty = ds.empty_conditioning().tensors()
    assert sorted(empty) == fields and all(torch.equal(empty[n], own[""][n]) for n in fields)


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sdxl"])
def test_training_from_the_deduplicated_cache_is_bit_identical_to_the_per_pair_layout(fixture, request, repeated,
                                                                                      tmp_path):
    """Several pairs per prompt, caption dropout, latent sampling: two optimizer steps read from the prompt table
    give exactly (==, bit for bit) the losses and weights of the same cache in format 2's per-pair layout, and
    the losses of encoding on the fly up to the last float bits (the encoders see other batches on the fly; after
    an lr 1e-2 Adam step SDXL's second loss differs by 2e-5 relative, exactly as much with a format-2 cache written
    by the code before de-duplication: 0.6918367 cached either way, 0.6918516 on the fly)."""
    model = request.getfixturevalue(fixture)
    common = [f"model.pretrained={model}", "data.resolution=32", "data.latent_sampling=mean", "data.caption_dropout=0.5",
              "train.max_steps=2", "train.batch_size=2", "train.learning_rate=1e-2", "train.checkpoint_every=0",
              "lora.rank=4", "output.report_to=none"]
    cfg = load_config(None, [f"data.source={repeated}", f"data.cache_dir={tmp_path / 'cache'}", *common])
    folder = prep.prepare_cache(cfg, storage_dtype="float32", shard_size=5, progress=False)
    old = _as_format_2(folder, tmp_path / "format2")
    runs = {"table": folder, "per_pair": old, "fly": repeated}
    for name, source in runs.items():
        assert main(["train", f"data.source={source}", f"output.dir={tmp_path / name}", *common]) == 0
    rows = {name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()] for name in runs}
    keys = ("loss", "err_policy_w", "err_policy_l", "err_ref_w", "err_ref_l", "grad_norm")
    assert len(rows["table"]) == 2
    assert [[r[k] for k in keys] for r in rows["table"]] == [[r[k] for k in keys] for r in rows["per_pair"]]
    weights = {name: load_file(str(next((tmp_path / name).glob("*.safetensors")))) for name in ("table", "per_pair")}
    assert sorted(weights["table"]) == sorted(weights["per_pair"])
    assert all(torch.equal(t, weights["per_pair"][k]) for k, t in weights["table"].items())
    for fly, cached in zip(rows["fly"], rows["table"]):
        for key in keys[:5]:
            assert cached[key] == pytest.approx(fly[key], rel=1e-4, abs=1e-7), key


@pytest.mark.fault(input="a cache of format 1 (before the torchvision resize fix) passed as `data.source`",
                   behaviour="exit 2: one line naming the format versions read and `diffusion-dpo prepare`")
def test_a_format_1_cache_is_refused_with_the_fix(tiny_sd, repeated, tmp_path, capsys):
    folder = prep.prepare_cache(_cfg(tiny_sd, repeated, tmp_path / "c"), progress=False)
    write_json_atomic(folder / MANIFEST, {**read_manifest(folder), "format_version": 1})
    capsys.readouterr()
    code = main(["train", f"model.pretrained={tiny_sd}", f"data.source={folder}", "data.resolution=32",
                 "train.max_steps=1", "output.report_to=none", f"output.dir={tmp_path / 'out'}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1
    assert "format version 1, this toolkit reads 2 and 3: prepare it again (`diffusion-dpo prepare`" in err[0]


@pytest.mark.fault(input="a prepared cache whose prompt-table file (`prompts-00000.safetensors`) was deleted",
                   behaviour="DataError naming the file and `diffusion-dpo prepare`, before any pair is read")
def test_a_missing_prompt_table_file_is_an_error_naming_it(tiny_sd, repeated, tmp_path):
    folder = prep.prepare_cache(_cfg(tiny_sd, repeated, tmp_path), progress=False)
    (folder / "prompts-00000.safetensors").unlink()
    with pytest.raises(DataError, match=r"lacks prompts-00000.safetensors .*`diffusion-dpo prepare`"):
        CachedPairDataset(folder, detect_spec(str(tiny_sd)))


def test_the_table_follows_the_sources_prompts_read_without_images(tmp_path):
    """PairSource.prompts() (Arrow: the caption column alone) is every pair's prompt in pair order, ties dropped and
    data.max_pairs applied; PromptRows keeps each exact string once, in order of first appearance."""
    from diffusion_dpo.cache.writer import PromptRows
    from diffusion_dpo.data.sources import open_source
    from diffusion_dpo.data.synthetic import write_pickapic_parquet

    parquet = write_pickapic_parquet(tmp_path / "t.parquet", n=10, ties=2)
    source = open_source(load_config(None, [f"data.source={parquet}", "data.max_pairs=9"]).data)
    assert len(source) == 9 and source.prompts() == [source[i].prompt for i in range(9)]
    table = PromptRows(["b", "a", "b", "", "a ", "a"])
    assert table.prompts == ["b", "a", "", "a "] and table.index == [0, 1, 0, 2, 3, 1]
    assert table.rows == {"b": 0, "a": 1, "": 2, "a ": 3}
