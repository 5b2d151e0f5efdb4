"""`diffusion-dpo prepare` as a user runs it: the CLI end to end, and kill -9 in the middle then a rerun."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusion_dpo.cache.store import MANIFEST
from diffusion_dpo.cli import main
from diffusion_dpo.data.synthetic import write_pickapic_parquet


@pytest.fixture(scope="module")
def parquet(tmp_path_factory):
    return write_pickapic_parquet(tmp_path_factory.mktemp("pp") / "train.parquet", n=24, corrupt=1)


def _args(model, source, cache_dir):
    return ["prepare", f"model.pretrained={model}", f"data.source={source}", "data.resolution=32",
            f"data.cache_dir={cache_dir}", "--shard-size", "1", "--batch-size", "1", "--no-progress"]


def _only_cache(cache_dir: Path) -> Path:
    (folder,) = [p for p in cache_dir.iterdir() if p.is_dir()]
    return folder


def test_prepare_cli_then_train_from_the_cache(tmp_path, tiny_sd, parquet, capsys):
    args = _args(tiny_sd, parquet, tmp_path / "cache")
    del args[args.index("--batch-size"):args.index("--batch-size") + 2]  # prepare's own default: 1 pair on a CPU
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "prepared 24 pairs" in out and "23 pairs, 1 corrupt skipped" in out and "bytes/pair" in out
    # where the time went, per pair
    assert re.search(r"\d\.\d{3} s/pair: images \d\.\d{3}, VAE \d\.\d{3}, text \d\.\d{3}, write \d\.\d{3}; "
                     r"1 pair per encoder call\)", out)
    folder = _only_cache(tmp_path / "cache")
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["complete"] and manifest["num_shards"] == 24 and manifest["num_pairs"] == 23
    assert main(["train", f"model.pretrained={tiny_sd}", f"data.source={folder}", "data.resolution=32",
                 "train.max_steps=1", "train.batch_size=2", "output.report_to=none", f"output.dir={tmp_path / 'out'}"]) == 0
    row = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["loss"] == pytest.approx(0.693147, abs=1e-5)


def test_train_rejects_a_cache_for_another_resolution(tmp_path, tiny_sd, parquet, capsys):
    assert main(_args(tiny_sd, parquet, tmp_path / "cache")) == 0
    folder = _only_cache(tmp_path / "cache")
    code = main(["train", f"model.pretrained={tiny_sd}", f"data.source={folder}", "data.resolution=64",
                 "train.max_steps=1", "output.report_to=none", f"output.dir={tmp_path / 'out'}"])
    assert code == 2 and "data.resolution: cache 32, training config 64" in capsys.readouterr().err


def test_kill_9_midway_then_rerun_equals_an_uninterrupted_run(tmp_path, tiny_sd, parquet):
    assert main(_args(tiny_sd, parquet, tmp_path / "whole")) == 0
    whole = _only_cache(tmp_path / "whole")

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "diffusion_dpo.cli", *_args(tiny_sd, parquet, tmp_path / "killed")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if len(list((tmp_path / "killed").glob("*/shard-*.safetensors"))) >= 2:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "prepare finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    killed = _only_cache(tmp_path / "killed")
    assert not json.loads((killed / MANIFEST).read_text())["complete"]
    shards = sorted(killed.glob("shard-*.safetensors"))
    assert 2 <= len(shards) < 24
    for shard in shards:  # whatever was left on disk is complete
        load_file(str(shard))

    assert main(_args(tiny_sd, parquet, tmp_path / "killed")) == 0
    assert killed.name == whole.name
    names = sorted(p.name for p in whole.glob("*.safetensors"))
    assert names == sorted(p.name for p in killed.glob("*.safetensors"))
    for name in names:
        a, b = load_file(str(whole / name)), load_file(str(killed / name))
        assert sorted(a) == sorted(b)
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    assert not [p for p in killed.iterdir() if p.name.endswith(".tmp")]
