"""`diffusion-dpo train` and its output folder: refused resumes across changed settings (and forced ones, recorded),
locked and foreign folders, full or read-only disks; all one line and exit 2."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from diffusion_dpo.cli import main
from diffusion_dpo.config import load_config
from diffusion_dpo.data.synthetic import write_manifest
from diffusion_dpo.train.run_dir import LOCK_FILE, RUN_FILE


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("man"), n=8)


def _train(out: Path, model, source, *extra: str) -> int:
    return main(["train", f"model.pretrained={model}", f"data.source={source}", "data.resolution=32",
                 "train.max_steps=2", "train.batch_size=2", "train.checkpoint_every=1", "train.learning_rate=1e-2",
                 "lora.rank=4", "output.report_to=none", f"output.dir={out}", *extra])


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "Traceback" not in err
    return err.splitlines()[-1]


@pytest.mark.fault(input="resume with a changed setting that determines the result (e.g. `train.beta`)",
                   behaviour="exit 2: names each changed key with both values; `train.resume=force` continues and "
                   "config.yaml, train_summary.json and the model card record the change")
@pytest.mark.fault(input="resume with another `lora.rank`, `lora.target_modules`, `train.finetune` or "
                   "`train.optimizer`", behaviour="exit 2 even with `train.resume=force`: names the key")
@pytest.mark.fault(input="`train.resume=never` into an output.dir with checkpoints",
                   behaviour="exit 2: a new run would mix with the old checkpoints")
def test_resume_across_changed_settings_is_refused_or_forced_and_recorded(tmp_path, tiny_sd, manifest, capsys):
    out = tmp_path / "run"
    assert _train(out, tiny_sd, manifest) == 0
    capsys.readouterr()
    card = (out / "README.md").read_text()

    assert _train(out, tiny_sd, manifest, "train.max_steps=3", "train.beta=5000", "train.learning_rate=2e-2") == 2
    err = _one_line_error(capsys)
    assert "checkpoint-2 was trained with other settings" in err
    assert "train.beta 2000.0 -> 5000.0" in err and "train.learning_rate 0.01 -> 0.02" in err
    assert "train.resume=force" in err
    assert (out / "README.md").read_text() == card  # nothing rewritten
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2"]

    assert _train(out, tiny_sd, manifest, "train.max_steps=3", "lora.rank=8", "train.resume=force") == 2
    assert "lora.rank 4 -> 8 changes the shape" in _one_line_error(capsys)
    assert _train(out, tiny_sd, manifest, "train.resume=never") == 2
    assert "holds checkpoints up to step 2 and train.resume=never" in _one_line_error(capsys)

    assert _train(out, tiny_sd, manifest, "train.max_steps=3", "train.beta=5000", "train.resume=force") == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps_this_run"] == 1
    record = {"step": 2, "checkpoint": "checkpoint-2", "changed": {"train.beta": [2000.0, 5000.0]}}
    assert summary["forced_resumes"] == [record]
    text = (out / "config.yaml").read_text()
    assert text.startswith("# train.resume=force at step 2 (checkpoint-2); changed (checkpoint -> this config): "
                           "train.beta 2000.0 -> 5000.0\n")
    assert load_config(out / "config.yaml").train.beta == 5000.0  # the comment keeps it a loadable config
    assert "| 2 | train.beta 2000.0 -> 5000.0 |" in (out / "README.md").read_text()

    # settings that do not change the weights may change; the forced resume stays on record
    assert _train(out, tiny_sd, manifest, "train.max_steps=4", "train.beta=5000", "train.checkpoint_every=3",
                  "train.checkpoints_total_limit=2", "train.log_every=2", "train.lean_autograd=false") == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["steps_this_run"] == 1 and summary["forced_resumes"] == [record]
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["max_steps"] == 4
    assert not (out / LOCK_FILE).exists()  # released at the end of the run


@pytest.mark.fault(input="output.dir that is not empty and holds no run of ours (e.g. a user's README.md)",
                   behaviour="exit 2: names the folder and its files; nothing overwritten")
@pytest.mark.fault(input="output.dir under a path that is a file", behaviour="exit 2: says a part of the path is a file")
def test_foreign_or_impossible_output_dir_is_refused(tmp_path, tiny_sd, manifest, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "README.md").write_text("my own notes")
    (out / "config.yaml").write_text("mine: true\n")
    assert _train(out, tiny_sd, manifest) == 2
    err = _one_line_error(capsys)
    assert f"output.dir {out} is not empty (README.md, config.yaml)" in err and "choose a new or empty output.dir" in err
    assert (out / "README.md").read_text() == "my own notes" and (out / "config.yaml").read_text() == "mine: true\n"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.yaml"]

    (tmp_path / "file").write_text("x")
    assert _train(tmp_path / "file" / "run", tiny_sd, manifest) == 2
    assert "a part of this path is a file" in _one_line_error(capsys)


@pytest.mark.fault(input="`train` into an output.dir locked by a live run",
                   behaviour="exit 2 before loading any model: names the pid; `train.lock` of a dead run is taken over")
def test_second_run_on_a_locked_dir_exits_2_and_a_stale_lock_is_taken_over(tmp_path, tiny_sd, manifest, capsys,
                                                                            caplog):
    out = tmp_path / "run"
    out.mkdir()
    hold = ("import sys; from pathlib import Path; from diffusion_dpo.train.run_dir import acquire_lock; "
            "acquire_lock(Path(sys.argv[1])); print('locked', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert _train(out, tiny_sd, manifest) == 2
        assert f"is in use by another training run (pid {proc.pid} on host" in _one_line_error(capsys)
    finally:
        proc.kill()
        proc.wait()
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # the killed holder's lock is left behind
    with caplog.at_level(logging.WARNING, logger="diffusion_dpo"):
        assert _train(out, tiny_sd, manifest, "train.max_steps=1") == 0
    assert f"left by pid {proc.pid}" in caplog.text
    assert (out / RUN_FILE).is_file() and not (out / LOCK_FILE).exists()


def _fail_for_lock(real, errno_):
    def fake(path, *args, **kwargs):
        if str(path).endswith(LOCK_FILE):
            raise OSError(errno_, os.strerror(errno_), str(path))
        return real(path, *args, **kwargs)
    return fake


@pytest.mark.fault(input="read-only or full output.dir", behaviour="exit 2 before loading any model: "
                   "`output.dir ... is not writable (read-only file system)` / `is full (no space left on device)`")
@pytest.mark.parametrize("errno_, words", [(errno.EROFS, "is not writable (read-only file system)"),
                                           (errno.EACCES, "is not writable (permission denied)"),
                                           (errno.ENOSPC, "is full (no space left on device)")])
def test_unwritable_output_dir_is_refused_early(tmp_path, manifest, capsys, monkeypatch, errno_, words):
    # the model does not exist: the refusal must come first, before anything is loaded
    monkeypatch.setattr(os, "open", _fail_for_lock(os.open, errno_))
    assert _train(tmp_path / "run", tmp_path / "no_model", manifest) == 2
    err = _one_line_error(capsys)
    assert f"output.dir {tmp_path / 'run'} {words}" in err


@pytest.mark.fault(input="disk full, quota exceeded or permission denied in the middle of any command",
                   behaviour="exit 2: one line, `no space left on device: PATH` (train names output.dir when the "
                   "system names no file)")
@pytest.mark.parametrize("errno_, words, filename", [(errno.ENOSPC, "no space left on device", None),
                                                     (errno.EDQUOT, "disk quota exceeded", "/data/x.safetensors"),
                                                     (errno.EROFS, "not writable (read-only file system)", "/ro/x")])
def test_disk_errors_during_a_command_are_one_line(tmp_path, capsys, monkeypatch, errno_, words, filename):
    from diffusion_dpo.train import trainer

    def full_disk(cfg, progress=True):
        raise OSError(errno_, os.strerror(errno_), filename)

    monkeypatch.setattr(trainer, "train", full_disk)
    assert main(["train", "model.pretrained=x", "data.source=y", f"output.dir={tmp_path / 'o'}"]) == 2
    err = _one_line_error(capsys)
    assert err.startswith(f"error: {words}: {filename or tmp_path / 'o'}: ")


@pytest.mark.fault(input="config file with malformed YAML", behaviour="exit 2: `FILE:LINE:COLUMN: malformed YAML`")
@pytest.mark.fault(input="config file that is not UTF-8", behaviour="exit 2: names the file and the byte")
def test_unreadable_config_files_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  beta: 5000\n  learning_rate: [1e-5\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert _one_line_error(capsys).startswith(f"error: {bad}:4:1: malformed YAML")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("data:\n  source: café.jsonl\n".encode("latin-1"))
    assert main(["train", "--config", str(latin)]) == 2
    assert f"{latin}: not UTF-8 text (byte 0xe9" in _one_line_error(capsys)
