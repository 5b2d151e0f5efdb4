"""train.curriculum: difficulty levels from hand-made meta, the cumulative easy-to-hard order, resume and sharding."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from diffusion_dpo.config import load_config
from diffusion_dpo.data.records import PairRecord
from diffusion_dpo.errors import ConfigError, DataError
from diffusion_dpo.train.curriculum import CurriculumOrder, difficulty_levels, order_pairs
from diffusion_dpo.train.pair_order import PairOrder


def _records(**columns) -> list[PairRecord]:
    n = len(next(iter(columns.values())))
    return [PairRecord("p", "w.png", "l.png", f"line{i + 1}", {k: v[i] for k, v in columns.items()}) for i in range(n)]


def test_rank_difference_levels_follow_the_paper_intervals():
    # M = 5 images: rank differences 1..4. B = 2: level 1 = (2, 4] -> {3, 4}, level 2 = (0, 2] -> {1, 2}
    recs = _records(rank_difference=[1, 2, 3, 4], images_per_prompt=[5] * 4)
    assert difficulty_levels(recs, "rank_difference", 2, "m") == [2, 2, 1, 1]
    # B = 5: (3.2, 4] -> 4; (2.4, 3.2] -> 3; (1.6, 2.4] -> 2; (0.8, 1.6] -> 1; (0, 0.8] holds none
    assert difficulty_levels(recs, "rank_difference", 5, "m") == [4, 3, 2, 1]
    # each pair's own M (CSV strings too): M = 3, B = 2: (1, 2] -> 2 is level 1, (0, 1] -> 1 is level 2
    mixed = _records(rank_difference=["1", "2", 4], images_per_prompt=["3", "3", 5])
    assert difficulty_levels(mixed, "rank_difference", 2, "m") == [2, 1, 1]
    assert difficulty_levels(recs, "rank_difference", 1, "m") == [1, 1, 1, 1]


def test_score_gap_levels_are_equal_width_bins_largest_first():
    # gaps 0.125 .. 1.125, B = 4, width 0.25: level 1 (0.875, 1.125], 2 (0.625, 0.875], 3 (0.375, 0.625],
    # 4 (0.125, 0.375] plus the smallest gap 0.125; 0.625 sits on a bin's upper edge: level 3
    recs = _records(margin=[0.125, 0.25, 0.625, 1.125, 0.7, 0.875])
    assert difficulty_levels(recs, "score_gap", 4, "m") == [4, 4, 3, 1, 2, 2]
    assert difficulty_levels(_records(margin=[0.3, 0.3]), "score_gap", 3, "m") == [1, 1]  # one gap: one level


# 8 pairs, B = 3: pool of level 1 = {0, 2, 6}, levels 1..2 = {0, 1, 2, 4, 6}, levels 1..3 = all
LEVELS = [1, 2, 1, 3, 2, 3, 1, 3]
POOLS = [{0, 2, 6}, {0, 1, 2, 4, 6}, set(range(8))]


def _take(order, n):
    return list(itertools.islice(iter(order), n))


def test_order_is_cumulative_by_level_and_seeded_as_pair_order():
    # batch 2, phase length 2 micro-batches. Phase 1: 3 pairs -> 1 micro-batch per epoch, epochs 0, 1.
    # Phase 2 (from micro-batch 2): 5 pairs -> 2 per epoch, epoch 0 + ceil(2/1) = 2. Phase 3 (from micro-batch 4):
    # 8 pairs -> 4 per epoch, epochs 2 + ceil(2/2) = 3, 4, ...
    order = CurriculumOrder(LEVELS, 3, phase_length=2, batch_size=2, seed=5)
    batches = _take(order, 12)
    assert [b[0][0] for b in batches] == [0, 1, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4]
    for m, batch in enumerate(batches):
        level = min(3, m // 2 + 1)
        assert order.level(m) == level
        assert {i for _, i in batch} <= POOLS[level - 1], (m, batch)  # only active levels
    # level 1 only at first, then the harder levels join; level 3 pairs appear only from micro-batch 4
    assert not {i for b in batches[:4] for _, i in b} & {3, 5, 7}
    assert {i for b in batches[4:8] for _, i in b} == POOLS[2]  # a full epoch of phase 3: every pair once
    # each epoch is the pool shuffled by the seed PairOrder gives that epoch
    for m in (0, 2, 4, 8):
        epoch = batches[m][0][0]
        pool = torch.tensor(sorted(POOLS[order.level(m) - 1]))
        g = torch.Generator().manual_seed(5 * 7919 + epoch)
        perm = pool[torch.randperm(len(pool), generator=g)].tolist()
        j = order.position(m)[1]
        assert [i for _, i in batches[m]] == perm[2 * j: 2 * j + 2]


def test_one_level_is_the_plain_order():
    plain = _take(PairOrder(8, batch_size=2, seed=3), 9)
    assert _take(CurriculumOrder([1] * 8, 1, phase_length=3, batch_size=2, seed=3), 9) == plain


def test_resumed_mid_level_equals_uninterrupted_and_two_processes_split_one():
    straight = _take(CurriculumOrder(LEVELS, 3, 3, batch_size=2, seed=1), 14)
    for start in (1, 4, 7):  # mid level 1, mid level 2, level 3
        assert _take(CurriculumOrder(LEVELS, 3, 3, batch_size=2, seed=1, start_micro_batch=start), 14 - start) \
            == straight[start:]
    r0 = _take(CurriculumOrder(LEVELS, 3, 3, batch_size=1, seed=1, rank=0, world_size=2), 14)
    r1 = _take(CurriculumOrder(LEVELS, 3, 3, batch_size=1, seed=1, rank=1, world_size=2), 14)
    assert [a + b for a, b in zip(r0, r1)] == straight


def test_log_fields_name_the_active_level_and_log_when_a_level_is_added(caplog):
    order = CurriculumOrder(LEVELS, 3, phase_length=2, batch_size=1, seed=0)
    with caplog.at_level("INFO", logger="diffusion_dpo"):
        fields = [order.log_fields(m) for m in range(6)]
    assert [f["curriculum_level"] for f in fields] == [1, 1, 2, 2, 3, 3]
    assert [f["curriculum_pairs"] for f in fields] == [3, 3, 5, 5, 8, 8]
    assert [r.getMessage().split(" active")[0] for r in caplog.records] == \
        ["curriculum: level 1 of 3", "curriculum: level 2 of 3", "curriculum: level 3 of 3"]
    assert PairOrder(8, 2, 0).log_fields(0) == {}  # no curriculum: metrics.jsonl as before


@pytest.mark.fault(input="`train.curriculum` levels 1..k with fewer pairs than one global micro-batch",
                   behaviour="error naming the levels, their pair counts and the fix")
def test_level_too_small_for_a_global_batch_is_refused():
    with pytest.raises(DataError, match=r"levels 1\.\.1 hold 3 pairs .*\[3\].*train.batch_size"):
        CurriculumOrder(LEVELS, 3, 2, batch_size=2, seed=0, world_size=2)


@pytest.mark.fault(input="`train.curriculum.enabled=true` on pairs without a `rank_difference` (or `margin`) column",
                   behaviour="error naming the column, the pair and `generate-pairs --strategy all-ranked`")
def test_pairs_without_difficulty_meta_are_refused():
    with pytest.raises(DataError, match=r"'rank_difference' column .* pair line2 has None.*all-ranked"):
        difficulty_levels(_records(rank_difference=[1, None], images_per_prompt=[3, 3]), "rank_difference", 2, "m")
    with pytest.raises(DataError, match=r"'margin' column .* pair line1 has 'big'"):
        difficulty_levels(_records(margin=["big"]), "score_gap", 2, "m")
    with pytest.raises(DataError, match=r"rank_difference 3 is not a whole number in \[1, images_per_prompt - 1 = 2\]"):
        difficulty_levels(_records(rank_difference=[3], images_per_prompt=[3]), "rank_difference", 2, "m")


@pytest.mark.fault(input="`train.curriculum.enabled=true` with a prepared latent cache or labelled single images",
                   behaviour="error: the curriculum needs a pair manifest's columns; names the source and the fix")
def test_curriculum_on_a_cache_or_labelled_images_is_refused():
    cfg = load_config(None, ["data.source=cachedir", "train.curriculum.enabled=true"])
    cached = SimpleNamespace(dataset=[0] * 4, labelled=False)  # a cache dataset keeps no records
    with pytest.raises(DataError, match="cachedir is a prepared latent cache: point data.source to the pairs.jsonl"):
        order_pairs(cfg, cached, 0, 1, 0)
    with pytest.raises(DataError, match="labelled single images"):
        order_pairs(cfg, SimpleNamespace(dataset=[0] * 4, labelled=True), 0, 1, 0)
    off = load_config(None, ["data.source=cachedir"])
    assert type(order_pairs(off, cached, 0, 1, 0)) is PairOrder  # off by default: the plain order


def _case(override, message, what):
    return pytest.param(override, message, marks=pytest.mark.fault(
        input=f"`{override}`", behaviour=f"config error naming the key: {what}"), id=override.split(".")[-1])


@pytest.mark.parametrize("override, message", [
    _case("train.curriculum.levels=0", "train.curriculum.levels must be >= 1", "must be >= 1"),
    _case("train.curriculum.steps_per_level=0", "train.curriculum.steps_per_level must be >= 1", "must be >= 1"),
    _case("train.curriculum.difficulty=loss", "train.curriculum.difficulty: 'loss' is not one of",
          "lists rank_difference, score_gap"),
])
def test_curriculum_config_is_validated(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
