"""Ownership of a training output folder (`output.dir`): one run at a time, only our own runs, and a
resume only with the settings its checkpoint was trained with.

    run_dir = RunDir.claim(cfg, is_main)   # Trainer.setup, before any model is loaded
    run_dir.write_config(cfg)             # config.yaml (+ the record of a forced resume)
    run_dir.release()                     # end of the run (also at process exit)

Lock: `train.lock` holds the pid, host and start time of the run that owns the folder, and that run holds an
exclusive flock on it. The kernel drops a flock when its process ends (even on kill -9), so a lock file
whose flock is free was left by a dead run: it is taken over with a log line. Only the main process of a
multi-process run locks. Creating the lock is also the early check that the folder is writable.

Ours: a folder is one of our runs when it holds `train_run.json` (written when a run claims it) or, for runs
made before that file existed, `model_spec.json` or a checkpoint. A non-empty folder that is not ours is
refused, so a user's README.md or config.yaml is never overwritten. Hidden entries (.*) are ignored: we never
write one there.

Resume: every key of the latest checkpoint's config.yaml must equal this run's value, except RESUME_FREE_KEYS
(bookkeeping, speed and memory settings that do not change the trained weights). `train.resume=force`
resumes anyway and records what changed in train_run.json, config.yaml, train_summary.json and the model
card. See docs/recipes.md ("Resume, checkpoints, many GPUs").
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import logging
import os
import socket
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from diffusion_dpo.config import RunConfig, to_dict
from diffusion_dpo.errors import UserError
from diffusion_dpo.runtime import write_text_atomic
from diffusion_dpo.typed_config import flatten
from diffusion_dpo.train import checkpoint as ckpt

log = logging.getLogger("diffusion_dpo")

LOCK_FILE = "train.lock"
RUN_FILE = "train_run.json"

# Keys that may change between a checkpoint and the run resuming it: they decide when and where things are
# written, how fast a step runs or how much memory it takes, never the trained weights. Every other key
# (including ones added later) must match. lean_autograd and gradient_checkpointing give identical gradients
# (tests); on_nonfinite only matters at a step that the old setting would have stopped at.
RESUME_FREE_KEYS = frozenset({
    "train.checkpoint_every", "train.checkpoints_total_limit", "train.log_every", "train.resume",
    "train.on_nonfinite", "train.gradient_checkpointing", "train.lean_autograd", "data.num_workers",
    "model.reference_on_cpu", "output.dir", "output.report_to", "output.save_full_pipeline", "output.push_to_hub",
    "lora.export_kohya",
})
# Schedules whose learning rate at a step does not depend on max_steps: extending such a run is free.
_SCHEDULES_WITHOUT_HORIZON = ("constant", "constant_with_warmup")
# Keys whose change makes the checkpoint's tensors or optimizer state fit no longer: not even forcible.
_SHAPE_KEYS = ("train.finetune", "train.optimizer", "lora.rank", "lora.target_modules", "train.curriculum.rank_schedule")
# errno values that mean "cannot write here" (flock-less filesystems are handled separately)
_NOT_WRITABLE = {errno.EACCES: "not writable (permission denied)", errno.EPERM: "not writable (permission denied)",
                 errno.EROFS: "not writable (read-only file system)", errno.ENOSPC: "full (no space left on device)",
                 errno.EDQUOT: "full (disk quota exceeded)"}


class RunDirError(UserError):
    """output.dir is locked by another run, holds something else, or a resume would mix settings."""


# ----------------------------------------------------------------------------------------------
# The lock


class _Lock:
    """One flock held by this process. Re-entrant per folder: a second Trainer in the same process (tests,
    `iterate`, a notebook re-running a crashed cell) shares it instead of locking itself out."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd, self.count = path, fd, 1

    def release(self) -> None:
        self.count -= 1
        if self.count:
            return
        _HELD.pop(self.path, None)
        try:  # unlink while still holding the flock, so a waiting opener never locks a removed file unnoticed
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)


_HELD: dict[Path, _Lock] = {}


@atexit.register
def _release_all() -> None:
    for held in list(_HELD.values()):
        held.count = 1
        held.release()


def _owner_text(owner: dict) -> str:
    return f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, started {owner.get('started', '?')}"


def _read_owner(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        owner = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):  # empty (just created) or torn by a crash
        return {}
    return owner if isinstance(owner, dict) else {}


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def acquire_lock(folder: Path) -> _Lock:
    """Lock `folder` for this process (the folder must exist); RunDirError if a live run holds it."""
    path = (folder / LOCK_FILE).resolve()
    held = _HELD.get(path)
    if held is not None:
        held.count += 1
        return held
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            free = True
        except BlockingIOError:
            free = False
        except OSError as err:  # a filesystem without flock (some network mounts): fall back to the pid
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            owner = _read_owner(fd)
            free = not (owner.get("host") == socket.gethostname() and owner.get("pid") != os.getpid()
                        and _pid_alive(owner.get("pid")))
        if not free:
            owner = _read_owner(fd)
            os.close(fd)
            raise RunDirError(f"output.dir {folder} is in use by another training run ({_owner_text(owner)}; lock "
                              f"{path}): wait for it to finish or stop it, or choose another output.dir")
        # the previous owner may have removed the file between our open and flock: then lock the new one
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    previous = _read_owner(fd)
    if previous and (previous.get("pid"), previous.get("host")) != (os.getpid(), socket.gethostname()):
        log.warning("taking over the stale lock %s left by %s: that process no longer holds it", path,
                    _owner_text(previous))
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:  # the first write into output.dir: a full or read-only disk fails here, before any model is loaded
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(owner).encode())
        os.fsync(fd)
    except OSError:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    lock = _HELD[path] = _Lock(path, fd)
    return lock


# ----------------------------------------------------------------------------------------------
# Ours or not, and resume compatibility


def _is_ours(out: Path) -> bool:
    return (out / RUN_FILE).is_file() or (out / "model_spec.json").is_file() or bool(ckpt.list_checkpoints(
        out / "checkpoints"))


def check_ours(out: Path) -> None:
    """Refuse a non-empty folder that no run of ours wrote (we would overwrite its README.md, config.yaml ...)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise RunDirError(f"output.dir {out} exists and is not a folder: choose another output.dir")
    entries = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.name != LOCK_FILE)
    if entries and not _is_ours(out):
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise RunDirError(f"output.dir {out} is not empty ({shown}) and holds no diffusion-dpo training run, whose "
                          "files would overwrite what is there: choose a new or empty output.dir")


def resume_differences(saved: dict, cfg: RunConfig) -> dict[str, tuple[Any, Any]]:
    """{key: (checkpoint value, this run's value)} for every key that determines the result and differs.
    A key missing on one side (written by another version) counts as its default."""
    default, old, new = flatten(to_dict(RunConfig())), flatten(saved), flatten(to_dict(cfg))
    free = set(RESUME_FREE_KEYS)
    t = cfg.train
    if t.lr_scheduler in _SCHEDULES_WITHOUT_HORIZON and t.warmup_ratio is None:
        free.add("train.max_steps")
    diff = {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, default.get(key)), new.get(key, default.get(key))
        if key not in free and a != b:
            diff[key] = (a, b)
    return diff


def describe_changes(changed: Any) -> str:
    """{key: (before, after)} (or a forced resume's note) as one line."""
    if isinstance(changed, dict):
        return ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
    return str(changed)


def check_resume(out: Path, cfg: RunConfig) -> Optional[dict]:
    """Compare the checkpoint a resume would load with `cfg`. Returns the record of a forced resume
    ({"step", "checkpoint", "changed"}) or None; raises RunDirError for a refused one."""
    latest = ckpt.latest(out / "checkpoints")
    if latest is None:
        return None
    step = int(latest.name.rsplit("-", 1)[1])
    if cfg.train.resume == "never":
        raise RunDirError(f"output.dir {out} holds checkpoints up to step {step} and train.resume=never would mix a "
                          f"new run with them: choose a new output.dir, or delete {out / 'checkpoints'} to start over")
    force = cfg.train.resume == "force"
    try:
        saved = yaml.safe_load((latest / "config.yaml").read_text(encoding="utf-8"))
        if not isinstance(saved, dict):
            raise ValueError("not a mapping")
    except (OSError, ValueError, yaml.YAMLError) as err:
        if not force:
            raise RunDirError(f"cannot read the settings of {latest} ({latest / 'config.yaml'}: {err}), so a resume "
                              "cannot be checked: set train.resume=force to resume anyway") from None
        return {"step": step, "checkpoint": latest.name, "changed": "unknown (checkpoint config.yaml unreadable)"}
    diff = resume_differences(saved, cfg)
    if not diff:
        return None
    shape = [k for k in _SHAPE_KEYS if k in diff]
    if shape:
        what = describe_changes({k: diff[k] for k in shape})
        raise RunDirError(f"cannot resume {latest}: {what} changes the shape of the trained weights or optimizer "
                          "state, even with train.resume=force; use the checkpoint's values or a new output.dir")
    if not force:
        raise RunDirError(f"{latest} was trained with other settings ({describe_changes(diff)}); resuming would describe "
                          "a run that never happened: use the checkpoint's values, a new output.dir, or "
                          "train.resume=force to continue anyway (recorded in config.yaml and the model card)")
    log.warning("train.resume=force: resuming %s with changed settings: %s", latest, describe_changes(diff))
    return {"step": step, "checkpoint": latest.name, "changed": {k: [a, b] for k, (a, b) in diff.items()}}


# ----------------------------------------------------------------------------------------------


def _not_writable(out: Path, err: OSError) -> RunDirError:
    what = _NOT_WRITABLE.get(err.errno, err.strerror or str(err))
    return RunDirError(f"output.dir {out} is {what} ({err.filename or out}): free space, fix its permissions, or "
                       "choose another output.dir")


def read_run_record(out: Path) -> dict:
    path = out / RUN_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def forced_resumes(out: Path) -> list[dict]:
    """Every forced resume of the run in `out`, oldest first (for the model card and train_summary.json)."""
    return read_run_record(out).get("forced_resumes", [])


class RunDir:
    """The claimed output folder of one run."""

    def __init__(self, out: Path, lock: Optional[_Lock], forced: Optional[dict], cfg: RunConfig):
        self.out, self.forced, self.cfg = out, forced, cfg
        # released by release(), or when a Trainer that never trained (bench, tests) is garbage collected
        self._release = weakref.finalize(self, lock.release) if lock is not None else None

    @classmethod
    def claim(cls, cfg: RunConfig, is_main: bool,
              resolve: Optional[Callable[[RunConfig], RunConfig]] = None) -> "RunDir":
        """Check ownership and resume compatibility on every process; the main process also creates the folder,
        locks it and marks it as ours. Raises RunDirError (one line) on refusal. `resolve` fills in the defaults
        that need the model (Trainer.setup: the family's lora.target_modules): called once the folder is locked,
        so an unusable output.dir is refused before the model is read; the resume check compares its result,
        kept as `RunDir.cfg`."""
        out = Path(cfg.output.dir)
        check_ours(out)
        lock = None
        if is_main:
            try:
                out.mkdir(parents=True, exist_ok=True)
                lock = acquire_lock(out)
            except (FileExistsError, NotADirectoryError):  # a file where a parent folder should be
                raise RunDirError(f"output.dir {out}: a part of this path is a file, not a folder: choose another "
                                  "output.dir") from None
            except OSError as err:
                if err.errno in _NOT_WRITABLE:
                    raise _not_writable(out, err) from None
                raise
        try:
            check_ours(out)  # again under the lock: another run may have filled the folder meanwhile
            if resolve is not None:
                cfg = resolve(cfg)
            forced = check_resume(out, cfg)
            if is_main and not (out / RUN_FILE).is_file():
                from diffusion_dpo import __version__

                write_text_atomic(out / RUN_FILE, json.dumps({"tool": "diffusion-dpo train", "version": __version__,
                                                          "forced_resumes": []}, indent=1) + "\n")
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return cls(out, lock, forced, cfg)

    def write_config(self, cfg: RunConfig) -> None:
        """Main process: write config.yaml, headed by a comment per forced resume, and record this run's one."""
        record = read_run_record(self.out)
        history = record.setdefault("forced_resumes", [])
        if self.forced is not None and self.forced not in history:
            history.append(self.forced)
            write_text_atomic(self.out / RUN_FILE, json.dumps(record, indent=1) + "\n")
        header = "".join(f"# train.resume=force at step {f['step']} ({f['checkpoint']}); changed (checkpoint -> "
                         f"this config): {describe_changes(f['changed'])}\n" for f in history)
        write_text_atomic(self.out / "config.yaml", header + yaml.safe_dump(to_dict(cfg), sort_keys=False))

    def release(self) -> None:
        if self._release is not None:
            self._release()  # a finalizer runs at most once

