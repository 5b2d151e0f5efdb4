"""The latent cache: cached == on the fly, key inputs, resumed == uninterrupted, corrupt pairs, flips, checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusion_dpo.cache import prepare as prep
from diffusion_dpo.cache import writer
from diffusion_dpo.cache.store import MANIFEST, CachedPairDataset, collate_cached, read_shard
from diffusion_dpo.cli import main
from diffusion_dpo.config import load_config
from diffusion_dpo.data.synthetic import write_mixed_size_manifest, write_pickapic_parquet
from diffusion_dpo.errors import CorruptImageError, DataError
from diffusion_dpo.runtime import ProcessInfo


@pytest.fixture(scope="module")
def parquet(tmp_path_factory):
    # 10 decisive pairs (one with a truncated JPEG) and 1 tie; 40x48 images, so the 32 px crop is real
    return write_pickapic_parquet(tmp_path_factory.mktemp("pp") / "train.parquet", n=10, ties=1, corrupt=1)


@pytest.fixture(scope="module")
def clean_parquet(tmp_path_factory):
    return write_pickapic_parquet(tmp_path_factory.mktemp("ppc") / "train.parquet", n=6)


def _cfg(model, source, cache_dir, *extra):
    return load_config(None, [f"model.pretrained={model}", f"data.source={source}", "data.resolution=32",
                              f"data.cache_dir={cache_dir}", *extra])


def _tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(str(p)) for p in sorted(folder.glob("*.safetensors"))}


def _assert_identical(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert sorted(ta[name]) == sorted(tb[name]), name
        for key in ta[name]:
            assert torch.equal(ta[name][key], tb[name][key]), (name, key)
    ma, mb = json.loads((a / MANIFEST).read_text()), json.loads((b / MANIFEST).read_text())
    assert ma["shards"] == mb["shards"] and ma["num_pairs"] == mb["num_pairs"]


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sdxl"])
def test_training_from_cache_gives_the_same_losses(fixture, request, tmp_path, clean_parquet):
    """Mean mode, float32 storage: two optimizer steps (with caption dropout) match on-the-fly encoding."""
    model = request.getfixturevalue(fixture)
    common = [f"model.pretrained={model}", "data.resolution=32", "data.latent_sampling=mean", "data.caption_dropout=0.5",
              "train.max_steps=2", "train.batch_size=2", "train.learning_rate=1e-2", "train.checkpoint_every=0",
              "lora.rank=4", "output.report_to=none"]
    cfg = load_config(None, [f"data.source={clean_parquet}", f"data.cache_dir={tmp_path / 'cache'}", *common])
    folder = prep.prepare_cache(cfg, storage_dtype="float32", batch_size=3, shard_size=4, progress=False)
    assert main(["train", f"data.source={clean_parquet}", f"output.dir={tmp_path / 'fly'}", *common]) == 0
    assert main(["train", f"data.source={folder}", f"output.dir={tmp_path / 'cached'}", *common]) == 0
    rows = {name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("fly", "cached")}
    assert len(rows["fly"]) == len(rows["cached"]) == 2
    for fly, cached in zip(rows["fly"], rows["cached"]):
        for key in ("loss", "err_policy_w", "err_policy_l", "err_ref_w", "err_ref_l"):
            assert cached[key] == pytest.approx(fly[key], rel=1e-5, abs=1e-7), key
        # the VAE sees the images in other batches than during training, which changes the last float bits;
        # the gradient norm (a sum of squares near a loss of ln 2, after an lr 1e-2 Adam step) magnifies them
        assert cached["grad_norm"] == pytest.approx(fly["grad_norm"], rel=1e-3)
    assert rows["cached"][1]["loss"] != pytest.approx(0.693147, abs=1e-6)  # the second step saw trained weights


def test_cache_key_changes_when_and_only_when_contents_change(tiny_sd, tiny_sdxl, parquet, clean_parquet, tmp_path):
    def key(*overrides, model=tiny_sd, source=parquet, dtype="float16"):
        folder, *_ = prep.locate_cache(_cfg(model, source, tmp_path, *overrides), dtype)
        return folder.name

    base = key()
    # settings that do not touch the cached tensors
    for same in ("train.beta=5000", "train.learning_rate=1e-3", "train.batch_size=4", "data.latent_sampling=mean",
                 "data.caption_dropout=0.2", "data.num_workers=2", "train.seed=7", "data.shared_transforms=true",
                 "lora.rank=16", "train.finetune=full", "data.on_corrupt=error", "model.prediction_type=v_prediction"):
        assert key(same) == base, same
    # inputs that do
    changed = {key("data.resolution=24"), key("data.crop=random"), key("data.random_flip=true"),
               key("model.frozen_dtype=bfloat16"), key(dtype="float32"), key(model=tiny_sdxl), key(source=clean_parquet),
               key("data.max_pairs=5"), key("model.revision=abc")}
    assert base not in changed and len(changed) == 9
    # the seed and shared draws matter once something is drawn at prepare time
    assert key("data.crop=random", "train.seed=7") != key("data.crop=random")
    assert key("data.crop=random", "data.shared_transforms=true") != key("data.crop=random")
    # SDXL's time-id mode decides whether the loser is brought to the winner's size; no time ids elsewhere
    assert key("data.sdxl_time_ids=image") == base
    assert key("data.sdxl_time_ids=image", model=tiny_sdxl) != key(model=tiny_sdxl)


@pytest.mark.parametrize("dies_at", ["prompts-00001.safetensors", "shard-00001.safetensors"])
def test_interrupted_prepare_resumes_to_an_identical_cache(dies_at, tiny_sd, parquet, tmp_path, monkeypatch):
    """Killed while writing the prompt table's second file, or the pairs' second shard: the rerun finishes the
    cache one run writes."""
    whole = prep.prepare_cache(_cfg(tiny_sd, parquet, tmp_path / "a"), batch_size=3, shard_size=3, progress=False)
    assert json.loads((whole / MANIFEST).read_text())["num_prompt_shards"] == 3  # 7 distinct prompts, 3 per file

    cfg = _cfg(tiny_sd, parquet, tmp_path / "b")
    real_write = writer.write_safetensors_atomic
    calls = []

    def dying_write(path, tensors, metadata, **kw):
        calls.append(path.name)
        if path.name == dies_at:  # die while writing it: leave a half-written temp file
            (path.parent / f".{path.name}.999.tmp").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        real_write(path, tensors, metadata, **kw)

    monkeypatch.setattr(writer, "write_safetensors_atomic", dying_write)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare_cache(cfg, batch_size=3, shard_size=3, progress=False)
    folder = whole.parent.parent / "b" / whole.name
    written = sorted(p.name for p in folder.glob("*.safetensors"))
    assert written == sorted(calls[:-1]) and dies_at not in written
    assert ("shard-00000.safetensors" in written) == dies_at.startswith("shard")  # the prompt table comes first
    assert json.loads((folder / MANIFEST).read_text())["complete"] is False
    with pytest.raises(DataError, match="incomplete"):
        CachedPairDataset(folder, None)
    # rerun with a different batch size and shard size: the shard size of the first run is kept
    monkeypatch.setattr(writer, "write_safetensors_atomic", real_write)
    calls.clear()
    resumed = prep.prepare_cache(cfg, batch_size=3, shard_size=5, progress=False)
    assert resumed == folder and not list(folder.glob(".*.tmp"))
    _assert_identical(whole, resumed)
    # a complete cache is reused, not rewritten
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    prep.prepare_cache(cfg, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_corrupt_pairs_are_counted_and_skipped_or_an_error(tiny_sd, parquet, tmp_path):
    folder = prep.prepare_cache(_cfg(tiny_sd, parquet, tmp_path), shard_size=4, progress=False)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["num_source_pairs"] == 10 and manifest["num_pairs"] == 9 and manifest["num_skipped"] == 1
    assert manifest["bytes_per_pair"] > 0 and manifest["complete"]
    with pytest.raises(CorruptImageError, match="on_corrupt=skip"):
        prep.prepare_cache(_cfg(tiny_sd, parquet, tmp_path / "err", "data.on_corrupt=error"), progress=False)


def test_dataset_items_and_collate(tiny_sd, tiny_sdxl, parquet, tmp_path):
    from diffusion_dpo.models.families import detect_spec

    for model, family in ((tiny_sd, "sd"), (tiny_sdxl, "sdxl")):
        folder = prep.prepare_cache(_cfg(model, parquet, tmp_path / family), shard_size=4, progress=False)
        ds = CachedPairDataset(folder, detect_spec(str(model)), "sample", resolution=32)
        assert len(ds) == 9
        batch = collate_cached([ds[i] for i in (0, 5, 8)])
        assert batch["latent_mean"].shape == batch["latent_std"].shape == (3, 2, 4, 16, 16)
        assert batch["latent_mean"].dtype == torch.float32 and (batch["latent_std"] > 0).all()
        assert batch["original_size"].tolist()[0] == [[40, 48], [40, 48]]
        assert batch["crop_top_left"].shape == (3, 2, 2) and batch["indices"].tolist() == [0, 5, 8]
        assert batch["num_skipped"] == 0
        assert batch["prompt_embeds"].shape[:2] == (3, 77)
        empty = ds.empty_conditioning()
        assert empty.prompt_embeds.shape == (1, 77, batch["prompt_embeds"].shape[2])
        if family == "sdxl":
            assert batch["pooled_prompt_embeds"].shape[0] == 3 and empty.pooled_prompt_embeds.shape[0] == 1
        else:
            assert "pooled_prompt_embeds" not in batch and empty.pooled_prompt_embeds is None


def test_cache_refuses_another_model_or_resolution(tiny_sd, tiny_sdxl, parquet, tmp_path):
    from diffusion_dpo.models.families import detect_spec

    folder = prep.prepare_cache(_cfg(tiny_sd, parquet, tmp_path), progress=False)
    with pytest.raises(DataError, match="model.pretrained.*model.family"):
        CachedPairDataset(folder, detect_spec(str(tiny_sdxl)))
    with pytest.raises(DataError, match="data.resolution: cache 32, training config 64"):
        CachedPairDataset(folder, detect_spec(str(tiny_sd)), resolution=64)
    with pytest.raises(DataError, match="not a prepared cache"):
        CachedPairDataset(tmp_path, detect_spec(str(tiny_sd)))


def test_flip_variants_match_on_the_fly_flips(tiny_sd, clean_parquet, tmp_path):
    """With data.random_flip the cache stores both mirror images; item i of epoch e uses exactly the flips
    PairDataset draws for (seed, e, i)."""
    from diffusion_dpo.data.dataset import PairDataset
    from diffusion_dpo.data.sources import open_source
    from diffusion_dpo.data.transforms import PairTransform
    from diffusion_dpo.models.encode import encode_images
    from diffusion_dpo.models.families import detect_spec
    from diffusion_dpo.models.loading import load_vae

    cfg = _cfg(tiny_sd, clean_parquet, tmp_path, "data.random_flip=true", "train.seed=3")
    folder = prep.prepare_cache(cfg, storage_dtype="float32", progress=False)
    spec = detect_spec(str(tiny_sd))
    cached = CachedPairDataset(folder, spec, "mean", seed=3)
    fly = PairDataset(open_source(cfg.data), PairTransform(32, "center", random_flip=True), seed=3)
    vae = load_vae(spec)
    flips_seen = set()
    for epoch in (0, 1):
        cached.set_epoch(epoch)
        fly.set_epoch(epoch)
        for i in range(len(fly)):
            raw = fly[i]
            mean, _ = encode_images(vae, raw["pixel_values"])
            item = cached[i]
            torch.testing.assert_close(item["latent_mean"], mean, rtol=1e-5, atol=1e-6)
            assert torch.equal(item["crop_top_left"], raw["crop_top_left"])
            flips_seen.add(cached._flips(i))
    assert len(flips_seen) > 1  # both variants were used


def test_two_processes_write_the_same_cache_as_one(tiny_sd, parquet, tmp_path, monkeypatch):
    """Shards are split k % world_size == rank; two workers (threads standing in for accelerate processes,
    synchronised by a barrier) produce the cache one process writes."""
    import threading

    one = prep.prepare_cache(_cfg(tiny_sd, parquet, tmp_path / "one"), shard_size=3, progress=False)
    cfg = _cfg(tiny_sd, parquet, tmp_path / "two")
    barrier = threading.Barrier(2, timeout=120)
    # from_pretrained patches module-level state while it builds a model: not thread-safe (processes are fine)
    lock, load = threading.Lock(), prep.load_encoders

    def locked_load(*args):
        with lock:
            return load(*args)

    monkeypatch.setattr(prep, "load_encoders", locked_load)
    results, errors = {}, []

    def worker(rank):
        try:
            dist = ProcessInfo(rank=rank, world_size=2, device="cpu", barrier=barrier.wait)
            results[rank] = prep.prepare_cache(cfg, shard_size=3, dist=dist, progress=False)
        except BaseException as err:  # noqa: BLE001 - re-raised below in the test thread
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results[0] == results[1]
    _assert_identical(one, results[0])



def test_sdxl_cache_gives_each_pair_the_on_the_fly_geometry_and_time_ids(tiny_sdxl, tmp_path):
    """Winner and loser of different sizes, random crops, independent flips (data.sdxl_time_ids=pair):
    the cache holds the latents, sizes and crops PairDataset makes, so the time ids agree and are one row per pair."""
    from diffusion_dpo.data.dataset import PairDataset, collate_pairs
    from diffusion_dpo.data.sources import open_source
    from diffusion_dpo.data.transforms import PairTransform
    from diffusion_dpo.models.encode import encode_images, pair_time_ids
    from diffusion_dpo.models.families import detect_spec
    from diffusion_dpo.models.loading import load_vae

    source = write_mixed_size_manifest(tmp_path / "data", n=6)
    cfg = _cfg(tiny_sdxl, source, tmp_path / "cache", "data.crop=random", "data.random_flip=true", "train.seed=3")
    folder = prep.prepare_cache(cfg, storage_dtype="float32", progress=False)
    spec = detect_spec(str(tiny_sdxl))
    cached = CachedPairDataset(folder, spec, "mean", seed=3)
    fly = PairDataset(open_source(cfg.data), PairTransform.from_config(cfg.data, size_conditioned=True), seed=3)
    vae = load_vae(spec)
    fly_items = [fly[i] for i in range(len(fly))]  # epoch 0: the crops the cache drew
    for i, raw in enumerate(fly_items):
        mean, _ = encode_images(vae, raw["pixel_values"])
        torch.testing.assert_close(cached[i]["latent_mean"], mean, rtol=1e-5, atol=1e-6)
    fly_batch, cached_batch = collate_pairs(fly_items), collate_cached([cached[i] for i in range(len(cached))])
    assert torch.equal(cached_batch["original_size"], fly_batch["original_size"])
    assert torch.equal(cached_batch["crop_top_left"], fly_batch["crop_top_left"])
    ids = pair_time_ids(fly_batch["original_size"], fly_batch["crop_top_left"], 32, "pair")
    assert torch.equal(pair_time_ids(cached_batch["original_size"], cached_batch["crop_top_left"], 32, "pair"), ids)
    assert (ids[:, :2] == torch.tensor([40.0, 48.0])).all()  # the winner's true size for both rows
    assert len({tuple(r) for r in ids[:, 2:4].tolist()}) > 1  # random crops differ across pairs


@pytest.mark.fault(input="SDXL cache prepared with `data.sdxl_time_ids=image` trained with `pair`",
                   behaviour="exit 2: names the pair, its two sizes and crops, and both fixes")
def test_training_refuses_a_per_image_cache_in_pair_mode(tiny_sdxl, tmp_path, capsys):
    source = write_mixed_size_manifest(tmp_path / "data", n=6)
    folder = prep.prepare_cache(_cfg(tiny_sdxl, source, tmp_path / "cache", "data.sdxl_time_ids=image"), progress=False)
    code = main(["train", f"model.pretrained={tiny_sdxl}", f"data.source={folder}", "data.resolution=32",
                 "train.max_steps=1", "train.batch_size=2", "output.report_to=none", f"output.dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "data.sdxl_time_ids=pair gives them one time-id row" in err and "set data.sdxl_time_ids=image" in err


def test_encoder_batch_size_does_not_change_the_cache(tiny_sd, parquet, tmp_path):
    """The default batch went from 8 pairs per encoder call to 1 on a CPU, for speed only. Flips (two variants,
    4 images per pair) and a corrupt pair included. One caveat, from PyTorch's convolution dispatch: with ONE
    thread, a call of 16+ images runs 1x1 convolutions with oneDNN instead of the native kernel, which changes the
    last float bits (about 1e-6 relative); with 2+ threads every call size uses oneDNN."""
    def cache(name, batch_size=None):
        return prep.prepare_cache(_cfg(tiny_sd, parquet, tmp_path / name, "data.random_flip=true"),
                                  storage_dtype="float32", batch_size=batch_size, shard_size=4, progress=False)

    default = cache("default")
    assert _tensors(default)["shard-00000.safetensors"]["latent_mean"].shape[1] == 2  # both flip variants
    _assert_identical(default, cache("b3", batch_size=3))  # 12 images per call, the same kernels: identical
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:  # the old default (8 pairs = 32 images per call) against the new one, as multi-threaded torch runs them
        _assert_identical(cache("old2", batch_size=8), cache("new2"))
    finally:
        torch.set_num_threads(threads)


def test_cache_is_the_encoders_applied_pair_by_pair(tiny_sd, clean_parquet, tmp_path):
    """Bit for bit: each stored latent distribution is encode_images on that pair's transformed images
    (chosen, rejected, then their mirror images), as one call; the text is the prompt encoder's."""
    from diffusion_dpo.data.sources import open_source
    from diffusion_dpo.data.transforms import PairTransform

    cfg = _cfg(tiny_sd, clean_parquet, tmp_path, "data.random_flip=true")
    folder = prep.prepare_cache(cfg, storage_dtype="float32", progress=False)
    shard = _tensors(folder)["shard-00000.safetensors"]
    _, _, spec, source = prep.locate_cache(cfg, "float32")
    enc = prep.load_encoders(cfg, spec, "cpu")
    items = prep._PairItems(open_source(cfg.data), range(6), PairTransform(32, "center"), True, 0, "skip")
    from diffusion_dpo.models.encode import encode_images

    per_pair = read_shard(folder, 0)  # the text conditioning in each pair's place, as format 2 stored it
    for j in range(6):
        item = items[j]
        mean, std = encode_images(enc.vae, item["pixels"].flatten(0, 1))  # (V*2, C, h, w): w, l, w flipped, l flipped
        assert torch.equal(shard["latent_mean"][j], mean.unflatten(0, (2, 2)))
        assert torch.equal(shard["latent_std"][j], std.unflatten(0, (2, 2)))
        assert torch.equal(per_pair["prompt_embeds"][j], enc.prompt_encoder([item["prompt"]]).prompt_embeds[0])


def test_default_encoder_calls_hold_one_pair_on_cpu(tiny_sd, parquet, tmp_path, monkeypatch):
    """On a CPU the VAE's activations of 16 images spill out of the caches and cost more per image than 2
    (docs/performance.md): by default each VAE call encodes one pair, and the time breakdown accounts for it."""
    from diffusion_dpo.models import encode

    sizes = []
    real = encode.encode_images

    def counting(vae, pixels):
        sizes.append(pixels.shape[0])
        return real(vae, pixels)

    monkeypatch.setattr(encode, "encode_images", counting)
    times = prep.PrepareTimes()
    prep.prepare_cache(_cfg(tiny_sd, parquet, tmp_path), shard_size=4, progress=False, times=times)
    assert prep.default_batch_size("cpu") == 1
    # 10 source pairs, one corrupt: 9 calls of chosen + rejected
    assert sizes == [2] * 9
    # with flips each pair has two variants (4 images): still 2 images per call, and 3 pairs per call hold 6
    sizes.clear()
    prep.prepare_cache(_cfg(tiny_sd, parquet, tmp_path / "flips", "data.random_flip=true"), progress=False)
    assert sizes == [2] * 18
    sizes.clear()
    prep.prepare_cache(_cfg(tiny_sd, parquet, tmp_path / "flips3", "data.random_flip=true"), batch_size=3,
                       progress=False)
    # loader batches of 3 source pairs: [0-2] (12 images), [3-5] with pair 4 corrupt (8), [6-8] (12), [9] (4);
    # each split into VAE calls of at most 3 pairs' images (6)
    assert sizes == [6, 6, 6, 2, 6, 6, 4]
    assert times.pairs == 10
    parts = times.per_pair()
    assert all(parts[k] > 0 for k in ("images", "vae", "text", "write"))
    assert parts["images"] + parts["vae"] + parts["text"] + parts["write"] <= parts["total"]
