"""`label`: relabelling with a user reward, tie margin and counts, agreement, resume == uninterrupted, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusion_dpo.config import DataConfig
from diffusion_dpo.data.dataset import decode_image
from diffusion_dpo.data.sources import open_source
from diffusion_dpo.data.synthetic import write_pickapic_parquet
from diffusion_dpo.errors import UserError
from diffusion_dpo.feedback.chunks import FAIL_ENV, InjectedFailure
from diffusion_dpo.feedback.label import label_pairs
from diffusion_dpo.feedback.reward_judge import load_judge

BRIGHT = "feedback_test_rewards:brightness"


def _gray(path: Path, value: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)
    return path.name


def _manifest(folder: Path, pairs: list[tuple[int, int]]) -> Path:
    rows = []
    for n, (chosen, rejected) in enumerate(pairs):
        rows.append({"prompt": f"prompt {n}", "chosen": "img/" + _gray(folder / "img" / f"{n}_c.png", chosen),
                     "rejected": "img/" + _gray(folder / "img" / f"{n}_r.png", rejected), "pair_id": n})
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _brightness(ref) -> float:
    return float(np.asarray(decode_image(ref)).mean())


def test_brighter_image_wins_near_ties_dropped_and_counted(tmp_path):
    # pair 0 already agrees, pair 1 is flipped, pair 2 differs by 1/255 = 0.0039 (< margin 0.01): a tie
    source = open_source(DataConfig(source=str(_manifest(tmp_path / "data", [(200, 50), (40, 220), (100, 101)]))))
    result = label_pairs(source, load_judge([BRIGHT]), tmp_path / "out", margin=0.01, progress=False)
    assert (result.pairs_in, result.kept, result.ties_dropped, result.corrupt_skipped) == (3, 2, 1, 0)
    assert result.agreement == 0.5
    relabelled = open_source(DataConfig(source=str(tmp_path / "out" / "pairs.jsonl"), format="manifest"))
    assert len(relabelled) == 2
    for record in relabelled:
        assert _brightness(record.chosen) > _brightness(record.rejected)
        assert record.meta["score_chosen"] - record.meta["score_rejected"] == pytest.approx(record.meta["margin"])
    assert [r.meta["original_label"] for r in relabelled] == [1, 0]
    assert [r.meta["source_meta"]["pair_id"] for r in relabelled] == [0, 1]
    summary = json.loads((tmp_path / "out" / "label_summary.json").read_text())
    assert summary["ties_dropped"] == 1 and summary["agreement"] == 0.5
    assert summary["judge"]["members"][0]["version"] == "user callable"


def test_agreeing_labels_give_100_percent_and_bytes_are_copied_verbatim(tmp_path):
    parquet = write_pickapic_parquet(tmp_path / "pp.parquet", n=6, ties=2, corrupt=1)  # rule: brighter is preferred
    source = open_source(DataConfig(source=str(parquet)))
    result = label_pairs(source, load_judge([BRIGHT]), tmp_path / "out", chunk_size=4, progress=False)
    assert (result.pairs_in, result.kept, result.corrupt_skipped, result.agreement) == (6, 5, 1, 1.0)
    rows = [json.loads(x) for x in (tmp_path / "out" / "pairs.jsonl").read_text().splitlines()]
    for row in rows:
        original = source[row["source_index"]]
        assert (tmp_path / "out" / row["chosen"]).read_bytes() == original.chosen  # JPEG kept as is
        assert row["chosen"].endswith(".jpg") and row["original_label"] == 1


def test_darker_reward_flips_every_label(tmp_path):
    parquet = write_pickapic_parquet(tmp_path / "pp.parquet", n=4)
    result = label_pairs(open_source(DataConfig(source=str(parquet))), load_judge(["feedback_test_rewards:darkness"]),
                         tmp_path / "out", progress=False)
    assert result.kept == 4 and result.agreement == 0.0


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    parquet = write_pickapic_parquet(tmp_path / "pp.parquet", n=10, ties=1, corrupt=1, rule="dark")
    source = open_source(DataConfig(source=str(parquet)))
    judge = load_judge([BRIGHT])
    label_pairs(source, judge, tmp_path / "straight", margin=0.001, chunk_size=3, progress=False)

    monkeypatch.setenv(FAIL_ENV, "2")
    with pytest.raises(InjectedFailure):
        label_pairs(source, judge, tmp_path / "resumed", margin=0.001, chunk_size=3, progress=False)
    assert len(list((tmp_path / "resumed" / "chunks").iterdir())) == 2
    assert not (tmp_path / "resumed" / "pairs.jsonl").exists()
    monkeypatch.delenv(FAIL_ENV)
    label_pairs(source, judge, tmp_path / "resumed", margin=0.001, chunk_size=5, progress=False)  # keeps size 3
    assert _tree(tmp_path / "resumed") == _tree(tmp_path / "straight")


def test_rerun_with_other_settings_is_refused(tmp_path):
    parquet = write_pickapic_parquet(tmp_path / "pp.parquet", n=2)
    source = open_source(DataConfig(source=str(parquet)))
    label_pairs(source, load_judge([BRIGHT]), tmp_path / "out", progress=False)
    with pytest.raises(UserError, match="different margin"):
        label_pairs(source, load_judge([BRIGHT]), tmp_path / "out", margin=0.5, progress=False)


@pytest.mark.parametrize("fn, message", [("raises", "raised ValueError: model weights not found"),
                                         ("wrong_shape", r"returned shape \(4, 2\) for 4 images"),
                                         ("returns_nan", "non-finite scores")])
def test_bad_user_function_is_named(fn, message, tmp_path):
    parquet = write_pickapic_parquet(tmp_path / "pp.parquet", n=2)
    with pytest.raises(UserError, match=f"feedback_test_rewards:{fn}.*{message}"):
        label_pairs(open_source(DataConfig(source=str(parquet))), load_judge([f"feedback_test_rewards:{fn}"]),
                    tmp_path / "out", progress=False)


def test_ensemble_is_weighted_sum_and_members_are_recorded(tmp_path):
    source = open_source(DataConfig(source=str(_manifest(tmp_path / "data", [(200, 50)]))))
    judge = load_judge([BRIGHT, "feedback_test_rewards:darkness"], weights=[3.0, 1.0])
    label_pairs(source, judge, tmp_path / "out", progress=False)
    row = json.loads((tmp_path / "out" / "pairs.jsonl").read_text())
    b, d = row["scores_chosen"][BRIGHT], row["scores_chosen"]["feedback_test_rewards:darkness"]
    assert row["score_chosen"] == pytest.approx(3 * b + d) and b == pytest.approx(200 / 255)
    with pytest.raises(UserError, match="one weight per reward"):
        load_judge([BRIGHT], weights=[1.0, 2.0])


def test_gap_equal_to_the_margin_is_kept(tmp_path):
    # scores 0.75 / 0.5 (gap 0.25 == margin, exactly: all are binary fractions) and 0.25 / 0.75 (gap 0.5,
    # flipped) are kept; 0.5 / 0.5 is an exact tie and dropped (docs: "below --margin (or exactly zero)")
    source = open_source(DataConfig(source=str(_manifest(tmp_path / "data", [(191, 128), (64, 191), (128, 129)]))))
    result = label_pairs(source, load_judge(["feedback_test_rewards:quarters"]), tmp_path / "out", margin=0.25,
                         progress=False)
    assert (result.kept, result.ties_dropped, result.agreed) == (2, 1, 1)
    rows = [json.loads(x) for x in (tmp_path / "out" / "pairs.jsonl").read_text().splitlines()]
    assert [(r["score_chosen"], r["score_rejected"], r["margin"]) for r in rows] == [(0.75, 0.5, 0.25),
                                                                                     (0.75, 0.25, 0.5)]


def _plant(out: Path, names: list[str]) -> None:
    for name in names:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x")


OWN_TEMPS = [".pairs.jsonl.4242.tmp", ".label_summary.json.4242.tmp", ".run.json.4242.tmp",
             "chunks/.chunk-00000.json.4242.tmp", "images/00000/.00000001_chosen.jpg.4242.tmp"]
FOREIGN_TEMPS = [".x.tmp", "notes/.x.tmp", "notes/deep/.pairs.jsonl.4242.tmp", "images/.x.tmp",
                 "images/00000/.x.tmp", "chunks/.x.tmp"]


def test_rerun_cleans_only_its_own_stale_temp_files(tmp_path):
    parquet = write_pickapic_parquet(tmp_path / "pp.parquet", n=2)
    source = open_source(DataConfig(source=str(parquet)))
    out = tmp_path / "out"
    label_pairs(source, load_judge([BRIGHT]), out, progress=False)
    _plant(out, OWN_TEMPS + FOREIGN_TEMPS)
    label_pairs(source, load_judge([BRIGHT]), out, progress=False)
    assert [n for n in OWN_TEMPS if (out / n).exists()] == []  # half-written files of an interrupted run
    assert [n for n in FOREIGN_TEMPS if not (out / n).exists()] == []  # not ours: untouched


@pytest.mark.fault(input="`label --out` a non-empty folder that is not a label run (e.g. the data's own folder)",
                   behaviour="exit 2: names the folder and a file in it; nothing written")
def test_out_folder_holding_other_files_is_refused(tmp_path, capsys):
    from diffusion_dpo.cli import main

    data = tmp_path / "data"
    manifest = _manifest(data, [(200, 50), (40, 220)]).rename(data / "pairs.jsonl")  # the user's own pairs.jsonl
    before = _tree(data)
    code = main(["label", "--data", str(manifest), "--reward", BRIGHT, "--out", str(data), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert str(data) in err and "pairs.jsonl" in err and "--out" in err
    assert _tree(data) == before  # the user's manifest and images are untouched, nothing added


@pytest.mark.fault(input="`label --out` an existing file", behaviour="exit 2: names it")
def test_out_that_is_a_file_is_refused(tmp_path):
    parquet = write_pickapic_parquet(tmp_path / "pp.parquet", n=2)
    (tmp_path / "out").write_text("mine")
    with pytest.raises(UserError, match="is a file"):
        label_pairs(open_source(DataConfig(source=str(parquet))), load_judge([BRIGHT]), tmp_path / "out",
                    progress=False)
    assert (tmp_path / "out").read_text() == "mine"


def test_an_empty_existing_out_folder_is_used(tmp_path):
    parquet = write_pickapic_parquet(tmp_path / "pp.parquet", n=2)
    (tmp_path / "out").mkdir()
    result = label_pairs(open_source(DataConfig(source=str(parquet))), load_judge([BRIGHT]), tmp_path / "out",
                         progress=False)
    assert result.kept == 2


def test_other_commands_run_folder_is_refused_naming_the_command(tmp_path):
    parquet = write_pickapic_parquet(tmp_path / "pp.parquet", n=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"command": "generate-pairs", "num_items": 2, "chunk_size": 8,
                                              "settings": {}}))
    with pytest.raises(UserError, match="`generate-pairs` run"):
        label_pairs(open_source(DataConfig(source=str(parquet))), load_judge([BRIGHT]), out, progress=False)


@pytest.mark.parametrize("content", [b'{"epochs": 3, "lr": 0.1}', b"\xff\xfe not json"])
@pytest.mark.fault(input="`label --out` a folder holding another tool's (or a damaged) `run.json`",
                   behaviour="exit 2: names the folder; nothing written")
def test_foreign_run_json_is_not_taken_for_ours(content, tmp_path):
    parquet = write_pickapic_parquet(tmp_path / "pp.parquet", n=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_bytes(content)
    with pytest.raises(UserError, match="run.json there is not the record of a `label` run"):
        label_pairs(open_source(DataConfig(source=str(parquet))), load_judge([BRIGHT]), out, progress=False)
    assert _tree(out) == {"run.json": content}
