from __future__ import annotations

import json

import pytest

from diffusion_dpo.errors import DataError
from diffusion_dpo.evaluate.prompts import BUILTIN_SETS, Prompt, load_prompts


def test_local_formats(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n a dog \n")
    (tmp_path / "p.csv").write_text("Prompts,Category\na cat,Colors\na dog,Counting\n")
    (tmp_path / "p.tsv").write_text("Prompt\tCategory\tChallenge\na cat\tAnimals\tBasic\n")
    (tmp_path / "p.json").write_text(json.dumps({"anime": ["a cat"], "photo": ["a dog"]}))
    (tmp_path / "l.json").write_text(json.dumps(["a cat", {"caption": "a dog", "style": "photo"}]))
    (tmp_path / "p.jsonl").write_text('{"text": "a cat", "category": "x"}\n{"prompt": "a dog"}\n')
    assert load_prompts(tmp_path / "p.txt").prompts == (Prompt("a cat"), Prompt("a dog"))
    assert load_prompts(tmp_path / "p.csv").prompts == (Prompt("a cat", "Colors"), Prompt("a dog", "Counting"))
    assert load_prompts(tmp_path / "p.tsv").prompts == (Prompt("a cat", "Animals"),)
    assert load_prompts(tmp_path / "p.json").prompts == (Prompt("a cat", "anime"), Prompt("a dog", "photo"))
    assert load_prompts(tmp_path / "l.json").prompts == (Prompt("a cat"), Prompt("a dog", "photo"))
    assert load_prompts(tmp_path / "p.jsonl").limit(1).prompts == (Prompt("a cat", "x"),)


def test_bad_files(tmp_path):
    (tmp_path / "p.csv").write_text("words\nx\n")
    with pytest.raises(DataError, match="no prompt column"):
        load_prompts(tmp_path / "p.csv")
    (tmp_path / "p.yaml").write_text("- x")
    with pytest.raises(DataError, match="unsupported prompt file type"):
        load_prompts(tmp_path / "p.yaml")
    with pytest.raises(DataError, match="neither a built-in name"):
        load_prompts(tmp_path / "missing.txt")


@pytest.mark.parametrize("name", sorted(BUILTIN_SETS))
def test_builtin_offline_without_cache_names_source_and_local_file_flag(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as info:
        load_prompts(name, cache_dir=tmp_path)
    msg = str(info.value)
    assert BUILTIN_SETS[name] in msg and "--prompts path/to/prompts.txt" in msg


def test_builtin_reads_the_cache(tmp_path):
    (tmp_path / "drawbench.jsonl").write_text('{"prompt": "a cat", "category": "Colors"}\n')
    ps = load_prompts("DrawBench", cache_dir=tmp_path, offline=True)
    assert ps.name == "drawbench" and ps.prompts == (Prompt("a cat", "Colors"),)


@pytest.mark.fault(input="prompt file with a UTF-8 byte-order mark (Excel's CSV UTF-8)",
                   behaviour="read: the mark is not part of the first prompt or column name")
def test_byte_order_mark_is_not_part_of_the_text(tmp_path):
    (tmp_path / "p.csv").write_bytes(b"\xef\xbb\xbfprompt,category\na cat,animals\n")
    (tmp_path / "p.txt").write_bytes(b"\xef\xbb\xbfa cat\n")
    assert load_prompts(tmp_path / "p.csv").prompts == (Prompt("a cat", "animals"),)
    assert load_prompts(tmp_path / "p.txt").prompts == (Prompt("a cat"),)


@pytest.mark.fault(input="prompt file that is not UTF-8", behaviour="DataError naming the file, line and byte")
def test_non_utf8_file_names_the_file_and_byte(tmp_path):
    (tmp_path / "p.jsonl").write_bytes(b'{"prompt": "a caf\xe9"}\n')  # latin-1
    expected = r"p\.jsonl: not UTF-8 text \(line 1, byte 17: b'\\xe9'\); save the prompt file as UTF-8"
    with pytest.raises(DataError, match=expected):
        load_prompts(tmp_path / "p.jsonl")
    (tmp_path / "p.txt").write_bytes(b"\xef\xbb\xbfa\nb\xff\n")  # byte-order mark + a bad byte on line 2
    with pytest.raises(DataError, match=r"line 2, byte 6: b'\\xff'"):
        load_prompts(tmp_path / "p.txt")


@pytest.mark.fault(input="`--prompts` a folder or a FIFO",
                   behaviour="DataError: not a regular file (a FIFO would block)")
def test_prompts_must_be_a_regular_file(tmp_path):
    import os

    (tmp_path / "dir.txt").mkdir()
    with pytest.raises(DataError, match="dir.txt: not a regular file"):
        load_prompts(tmp_path / "dir.txt")
    os.mkfifo(tmp_path / "fifo.txt")
    with pytest.raises(DataError, match="fifo.txt: not a regular file"):
        load_prompts(tmp_path / "fifo.txt")
