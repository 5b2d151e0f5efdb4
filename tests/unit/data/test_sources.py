"""open_source: every format yields the same pairs; labels, ties, caps, errors and fingerprints."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffusion_dpo.config import DataConfig
from diffusion_dpo.data.sources import check_fills_batch, open_source
from diffusion_dpo.data.synthetic import synthetic_pairs, write_folders, write_manifest, write_pickapic_parquet
from diffusion_dpo.errors import DataError


def _open(source, **kw):
    return open_source(DataConfig(source=str(source), **kw))


def _as_bytes(ref) -> bytes:
    return ref if isinstance(ref, bytes) else Path(ref).read_bytes()


def _triples(source) -> list[tuple[str, bytes, bytes]]:
    return [(r.prompt, _as_bytes(r.chosen), _as_bytes(r.rejected)) for r in (source[i] for i in range(len(source)))]


def _write_rows(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_every_format_reads_the_same_pairs(tmp_path):
    n, seed = 6, 3
    expected = [(p.prompt, p.chosen, p.rejected) for p in synthetic_pairs(n, seed)]
    parquet = write_pickapic_parquet(tmp_path / "pap" / "train.parquet", n, seed, ties=2)
    saved = tmp_path / "saved"
    datasets.Dataset.from_parquet(str(parquet)).save_to_disk(str(saved))
    saved_dict = tmp_path / "saved_dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_parquet(str(parquet))}).save_to_disk(str(saved_dict))
    sources = {
        "parquet file": parquet,
        "parquet glob": tmp_path / "pap" / "*.parquet",
        "parquet folder": tmp_path / "pap",
        "saved Dataset": saved,
        "saved DatasetDict": saved_dict,
        "manifest jsonl": write_manifest(tmp_path / "mj", n, "jsonl", seed),
        "manifest csv": write_manifest(tmp_path / "mc", n, "csv", seed),
        "folders jsonl": write_folders(tmp_path / "fj", n, seed, "jsonl"),
        "folders json": write_folders(tmp_path / "fo", n, seed, "json"),
        "folders tsv": write_folders(tmp_path / "ft", n, seed, "tsv"),
    }
    for name, path in sources.items():
        assert _triples(_open(path)) == expected, name


def test_manifest_extra_columns_go_to_meta_and_paths_resolve(tmp_path):
    source = _open(write_manifest(tmp_path, 3, "csv"))
    record = source[1]
    assert record.meta == {"pair_id": "pair00001"}
    assert Path(record.chosen) == tmp_path / "images" / "chosen" / "pair00001.jpg"


def test_pickapic_label_orientation(tmp_path):
    rows = [
        {"caption": "first wins", "jpg_0": b"A0", "jpg_1": b"A1", "label_0": 1.0, "label_1": 0.0},
        {"caption": "second wins", "jpg_0": b"B0", "jpg_1": b"B1", "label_0": 0.0, "label_1": 1.0},
    ]
    source = _open(_write_rows(tmp_path / "x.parquet", rows))
    assert (source[0].chosen, source[0].rejected) == (b"A0", b"A1")
    assert (source[1].chosen, source[1].rejected) == (b"B1", b"B0")  # label_0 = 0: jpg_1 is preferred
    assert source[1].meta["label_0"] == 0.0


def test_parquet_with_manifest_column_names(tmp_path):
    rows = [{"prompt": "p", "chosen": b"W", "rejected": b"L", "score": 0.5}]
    record = _open(_write_rows(tmp_path / "pairs.parquet", rows))[0]
    assert (record.prompt, record.chosen, record.rejected, record.meta) == ("p", b"W", b"L", {"score": 0.5})


def test_image_feature_columns_stay_encoded(tmp_path):
    pair = synthetic_pairs(1)[0]
    features = datasets.Features({"caption": datasets.Value("string"), "jpg_0": datasets.Image(),
                                  "jpg_1": datasets.Image(), "label_0": datasets.Value("float64")})
    ds = datasets.Dataset.from_dict({"caption": [pair.prompt], "jpg_0": [{"bytes": pair.rejected, "path": None}],
                                     "jpg_1": [{"bytes": pair.chosen, "path": None}], "label_0": [0.0]}, features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    record = _open(tmp_path / "saved")[0]
    assert (record.chosen, record.rejected) == (pair.chosen, pair.rejected)


def test_ties_are_dropped_counted_and_logged(tmp_path, caplog):
    path = write_pickapic_parquet(tmp_path / "t.parquet", n=5, ties=3)
    with caplog.at_level(logging.INFO, logger="diffusion_dpo"):
        source = _open(path)
    assert len(source) == 5
    assert source.stats["rows_read"] == 8 and source.stats["ties_dropped"] == 3 and source.stats["pairs"] == 5
    assert "dropped 3 tied rows" in caplog.text
    assert "ties dropped 3" in source.describe()
    assert [r.prompt for r in (source[i] for i in range(5))] == [p.prompt for p in synthetic_pairs(5)]


def test_keeping_ties_is_an_error(tmp_path):
    path = write_pickapic_parquet(tmp_path / "t.parquet", n=4, ties=2)
    with pytest.raises(DataError, match=r"2 tied row.*no winner.*drop_ties=true"):
        _open(path, drop_ties=False)


def test_invalid_labels_are_an_error(tmp_path):
    rows = [{"caption": "c", "jpg_0": b"a", "jpg_1": b"b", "label_0": 0.7}]
    with pytest.raises(DataError, match=r"labels.*rows \[0\]"):
        _open(_write_rows(tmp_path / "x.parquet", rows))


def test_max_pairs_caps_after_dropping_ties(tmp_path):
    source = _open(write_pickapic_parquet(tmp_path / "t.parquet", n=5, ties=3), max_pairs=4)
    assert len(source) == 4
    assert source.stats["beyond_max_pairs"] == 1 and source.stats["ties_dropped"] == 3
    assert "beyond data.max_pairs" in source.describe()


def test_missing_column_is_named(tmp_path):
    rows = [{"caption": "c", "jpg_0": b"a", "jpg_1": b"b"}]
    with pytest.raises(DataError, match=r"missing column\(s\) label_0; found columns caption, jpg_0, jpg_1"):
        _open(_write_rows(tmp_path / "x.parquet", rows))


def test_manifest_missing_column_is_named(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"prompt": "p", "chosen": "a.png"}\n')
    with pytest.raises(DataError, match=r"line 1: missing column\(s\) rejected"):
        _open(manifest)


def test_manifest_missing_files_are_counted(tmp_path):
    source = _open(write_manifest(tmp_path, 4, missing=1))
    assert len(source) == 4 and source.stats["missing_files"] == 1
    assert "1 referenced image files missing" in source.describe()


def test_folders_names_on_one_side_only(tmp_path):
    folder = write_folders(tmp_path, 3)
    (folder / "rejected" / "pair00001.jpg").unlink()
    with pytest.raises(DataError, match=r"only in chosen/ \(e.g. \['pair00001'\]\)"):
        _open(folder)


def test_folders_missing_prompt(tmp_path):
    folder = write_folders(tmp_path, 2, prompts_format="tsv")
    (folder / "prompts.txt").write_text("pair00000\tonly one\n")
    with pytest.raises(DataError, match=r"no prompt for 1 image name\(s\), e.g. \['pair00001'\]"):
        _open(folder)


def test_folders_explicit_prompts_file(tmp_path):
    folder = write_folders(tmp_path / "f", 2, prompts_format="json")
    (folder / "prompts.json").rename(tmp_path / "elsewhere.json")
    source = _open(folder, prompts_file=str(tmp_path / "elsewhere.json"))
    assert source[0].prompt == synthetic_pairs(2)[0].prompt


def test_nonexistent_source_is_named(tmp_path):
    missing = tmp_path / "nope" / "train.parquet"
    with pytest.raises(DataError, match=f"data.source not found: '{missing}'"):
        _open(missing)


def test_offline_hub_id_gives_a_clear_error():
    with pytest.raises(DataError, match=r"could not be reached while offline.*parquet file or glob.*save_to_disk"):
        _open("nobody-such-user/made-up-preference-pairs")


def test_cache_format_points_to_the_cache_module(tmp_path):
    with pytest.raises(DataError, match=r"diffusion_dpo.cache"):
        open_source(DataConfig(source=str(tmp_path), format="cache"))


def test_format_mismatch_is_an_error(tmp_path):
    path = write_manifest(tmp_path, 2)
    with pytest.raises(DataError, match=r"cannot read a .jsonl file as format 'pickapic'"):
        open_source(DataConfig(source=str(path), format="pickapic"))


def test_saved_dataset_dict_unknown_split(tmp_path):
    parquet = write_pickapic_parquet(tmp_path / "t.parquet", 2)
    datasets.DatasetDict({"train": datasets.Dataset.from_parquet(str(parquet))}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"no split 'validation'; available splits: train"):
        _open(tmp_path / "dd", split="validation")


def test_fingerprint_is_stable_and_tracks_what_determines_the_pairs(tmp_path):
    path = write_pickapic_parquet(tmp_path / "t.parquet", n=6, seed=0)
    base = _open(path).fingerprint
    assert _open(path).fingerprint == base  # re-open
    assert _open(tmp_path / "*.parquet").fingerprint == base  # same files, another spelling
    assert _open(path, drop_ties=False).fingerprint != base
    assert _open(path, max_pairs=3).fingerprint != base
    assert _open(path, max_pairs=100).fingerprint == base  # a cap above the pair count selects the same pairs
    write_pickapic_parquet(path, n=6, seed=1)  # same path and pair count, other content
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert _open(path).fingerprint != base


def test_manifest_fingerprint_tracks_image_files(tmp_path):
    manifest = write_manifest(tmp_path, 3)
    base = _open(manifest).fingerprint
    image = tmp_path / "images" / "chosen" / "pair00002.jpg"
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert _open(manifest).fingerprint != base


def test_sources_pickle_for_dataloader_workers(tmp_path):
    for path in (write_pickapic_parquet(tmp_path / "t.parquet", 3, ties=1), write_folders(tmp_path / "f", 3)):
        source = _open(path)
        clone = pickle.loads(pickle.dumps(source))
        assert _triples(clone) == _triples(source) and clone.fingerprint == source.fingerprint


# ----------------------------------------------------------------------------------------------
# Hostile inputs: FIFOs, non-UTF-8 text, sources with no pairs.


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.fault(input="manifest row whose image is a FIFO, device or folder",
                   behaviour="exit 2 when the data opens: names the manifest, the row and the path (never blocks)")
def test_manifest_fifo_image_is_refused_naming_the_row(tmp_path):
    manifest = write_manifest(tmp_path, 3)
    rows = manifest.read_text().splitlines()
    fifo = tmp_path / "images" / "rejected" / "pipe.png"
    os.mkfifo(fifo)
    rows[1] = rows[1].replace("rejected/pair00001.jpg", "rejected/pipe.png")  # line 2 of the manifest
    manifest.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=rf"{manifest}, pair line2: {fifo} is not a regular file \(a FIFO, device or folder\)"):
        _open(manifest)
    rows[1] = rows[1].replace("rejected/pipe.png", "rejected")  # the images/rejected folder itself
    manifest.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"pair line2: .*images/rejected is not a regular file"):
        _open(manifest)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.fault(input="folders-format image that is a FIFO, or `data.source` that is a FIFO",
                   behaviour="exit 2 when the data opens: names the pair and the path (never blocks)")
def test_folders_fifo_image_and_fifo_source_are_refused(tmp_path):
    folder = write_folders(tmp_path / "f", 2)
    image = folder / "rejected" / "pair00001.jpg"
    image.unlink()
    os.mkfifo(image)
    with pytest.raises(DataError, match=rf"pair pair00001: {image} is not a regular file"):
        _open(folder)
    os.mkfifo(tmp_path / "m.jsonl")
    with pytest.raises(DataError, match=r"m.jsonl' is not a regular file or folder \(a FIFO or device\)"):
        _open(tmp_path / "m.jsonl")


@pytest.mark.fault(input="manifest (JSONL / CSV) or prompts file that is not UTF-8",
                   behaviour="exit 2: names the file and the line of the first bad byte")
@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_non_utf8_manifest_names_the_file_and_line(tmp_path, fmt):
    manifest = write_manifest(tmp_path, 3, fmt=fmt)
    lines = manifest.read_bytes().split(b"\n")
    bad_line = 2  # JSONL: the second pair; CSV: the first pair (line 1 is the header)
    lines[bad_line - 1] = lines[bad_line - 1].replace(b"pair0000", "caf\u00e9".encode("latin-1"), 1)
    manifest.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match=rf"{manifest} line {bad_line}: not UTF-8 text \(byte 0xe9\)"):
        _open(manifest)


def test_manifest_text_edge_cases(tmp_path):
    # a UTF-8 BOM (Excel's CSV) is not part of the first column name; a prompt holding U+2028 stays one JSONL row
    csv_manifest = write_manifest(tmp_path / "c", 2, fmt="csv")
    csv_manifest.write_bytes(b"\xef\xbb\xbf" + csv_manifest.read_bytes())
    assert [r.prompt for r in (_open(csv_manifest)[i] for i in range(2))] == [p.prompt for p in synthetic_pairs(2)]
    jsonl = write_manifest(tmp_path / "j", 2)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    rows[0]["prompt"] = "a cat\u2028a dog"
    jsonl.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    assert _open(jsonl)[0].prompt == "a cat\u2028a dog"


@pytest.mark.fault(input="prompts file of the folders format that is not UTF-8 or not valid JSON",
                   behaviour="exit 2: names the file and the line")
def test_bad_prompts_file_names_the_file_and_line(tmp_path):
    folder = write_folders(tmp_path / "f", 2, prompts_format="jsonl")
    prompts = folder / "prompts.jsonl"
    lines = prompts.read_text().splitlines()
    prompts.write_bytes((lines[0] + "\n" + lines[1][:-3]).encode() + b"\xff\n")
    with pytest.raises(DataError, match=rf"{prompts} line 2: not UTF-8 text \(byte 0xff\)"):
        _open(folder)
    prompts.write_text(lines[0] + "\n" + lines[1][:-3] + "\n")
    with pytest.raises(DataError, match=rf"{prompts} line 2: not valid JSON"):
        _open(folder)


@pytest.mark.fault(input="data whose every row is a tie, or an empty manifest",
                   behaviour="exit 2 before any model loads: says no preference pairs and why")
def test_a_source_without_pairs_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"gives no preference pairs: every one of its 3 rows is a tie"):
        _open(write_pickapic_parquet(tmp_path / "t.parquet", n=0, ties=3))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"empty.jsonl gives no preference pairs: it has no rows"):
        _open(tmp_path / "empty.jsonl")


@pytest.mark.fault(input="`data.max_pairs=0` (or negative)", behaviour="exit 2: names max_pairs and the fix")
@pytest.mark.parametrize("max_pairs", [0, -1])
def test_max_pairs_below_one_is_an_error(tmp_path, max_pairs):
    # -1 used to slice the last pair off silently (records[:-1])
    with pytest.raises(DataError, match=rf"max_pairs={max_pairs} \(data.max_pairs / --max-pairs\) leaves no pairs"):
        _open(write_manifest(tmp_path, 3), max_pairs=max_pairs)


@pytest.mark.fault(input="fewer pairs than `train.batch_size` x processes",
                   behaviour="exit 2 before any model loads: names the counts and the fix")
def test_too_few_pairs_for_one_batch_names_the_counts(tmp_path):
    source = _open(write_pickapic_parquet(tmp_path / "t.parquet", n=5, ties=3), max_pairs=2)
    check_fills_batch(len(source), batch_size=1, num_processes=2, stats=source.stats)  # exactly one batch: fine
    with pytest.raises(DataError, match=r"^2 pairs \(8 rows read, 3 ties dropped, 3 beyond data.max_pairs\) cannot fill one "
                                        r"micro-batch of train.batch_size 2 x 2 process\(es\) = 4 pairs: lower train.batch_size"):
        check_fills_batch(len(source), batch_size=2, num_processes=2, stats=source.stats)
