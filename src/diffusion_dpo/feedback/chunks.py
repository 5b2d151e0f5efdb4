"""Resumable, shardable work in fixed chunks: the machinery `label` and `generate-pairs` share.

Item range [0, N) is cut into chunks of `chunk_size`; chunk k covers [k*S, (k+1)*S). A finished chunk's
results go to `chunks/chunk-0000k.json`, written to a temporary file and renamed, so it exists complete
or not at all. A rerun skips finished chunks; the final output is assembled from the chunk files in
order, so an interrupted-then-resumed run writes exactly the bytes of an uninterrupted one.

Under `accelerate launch`, process r takes chunks k with k % world_size == r (runtime.ProcessInfo);
the main process assembles once every process has passed the barrier.

`run.json` records the command and the settings that determine the results; a rerun with different settings
(or another command's folder) is refused instead of mixing outputs. The chunk size of an interrupted run is kept.
An existing `--out` must be empty or one of this command's runs (it has run.json): the commands never write
into, nor clean, a folder of the user's.

Every file is written as a temporary `.NAME.PID.tmp` next to NAME and renamed (runtime.atomic_path, without
fsync: the runs are made resumable against interruptions, not power loss). A rerun deletes only such
temporary files of the files this command writes (`outputs`: glob patterns relative to the folder, e.g.
"images/[0-9]*.png"), never any other `.tmp` file.

Test hook: with DIFFUSION_DPO_FAIL_AFTER_CHUNKS=k set, a process raises after writing its k-th chunk
(simulates a kill midway; used by the resume tests).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from diffusion_dpo.errors import UserError

FAIL_ENV = "DIFFUSION_DPO_FAIL_AFTER_CHUNKS"
RUN_FILE = "run.json"


class InjectedFailure(RuntimeError):
    """Raised by the DIFFUSION_DPO_FAIL_AFTER_CHUNKS test hook."""


def temp_pattern(output: str) -> str:
    """Glob of the temporary files (any pid; runtime.temp_path names them) of the outputs matching glob `output`
    ("dir/name")."""
    folder, _, name = output.rpartition("/")
    return f"{folder}/.{name}.[0-9]*.tmp" if folder else f".{name}.[0-9]*.tmp"


def dumps_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


OWN_OUTPUTS = (RUN_FILE, "chunks/chunk-[0-9]*.json")  # what ChunkedRun itself writes


class ChunkedRun:
    """Chunk bookkeeping for one output folder. Settings in `settings` must match on a rerun. `outputs`: glob
    patterns (relative to `out`) of the files the command writes there, whose stale temporary files a rerun
    deletes."""

    def __init__(self, out: Path, num_items: int, chunk_size: int, settings: dict, rank: int = 0, world_size: int = 1,
                 command: str = "feedback", outputs: tuple[str, ...] = ()):
        if chunk_size < 1:
            raise UserError(f"--chunk-size must be >= 1, got {chunk_size}")
        self.out, self.rank, self.world_size = Path(out), rank, world_size
        self.chunk_dir = self.out / "chunks"
        self.command, self.outputs = command, OWN_OUTPUTS + tuple(outputs)
        run_path = self.out / RUN_FILE
        self._check_folder(run_path)
        if run_path.is_file():
            old = self._read_run(run_path)
            if old.get("command", command) != command:  # folders of older versions have no "command"
                raise UserError(f"{self.out} holds a `{old['command']}` run, not a `{command}` one; "
                                f"pass another --out")
            if old["settings"] != settings or old["num_items"] != num_items:
                diff = sorted(k for k in set(old["settings"]) | set(settings)
                              if old["settings"].get(k) != settings.get(k))
                what = ", ".join(diff) if diff else "the number of items"
                raise UserError(f"{self.out} holds an unfinished or finished `{command}` run with different {what}; "
                                f"pass another --out, or delete {self.out} to start over")
            chunk_size = old["chunk_size"]  # keep the boundaries of the interrupted run
        self.chunk_size = chunk_size
        self.num_items = num_items
        self.num_chunks = -(-num_items // chunk_size)
        self.settings = settings
        self._run_path, self._written = run_path, 0

    def _read_run(self, run_path: Path) -> dict:
        """The run.json of a previous run; another tool's run.json (or a damaged one) is not taken for ours."""
        try:
            old = json.loads(run_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            old = None
        if not (isinstance(old, dict) and {"num_items", "chunk_size", "settings"} <= set(old)
                and isinstance(old["settings"], dict)):
            raise UserError(f"--out {self.out}: {RUN_FILE} there is not the record of a `{self.command}` run; pass a "
                            f"new or empty folder as --out")
        return old

    def _stale_temp_files(self) -> list[Path]:
        """Temporary files of this command's outputs left by an interrupted run (any pid)."""
        return sorted({p for output in self.outputs for p in self.out.glob(temp_pattern(output)) if p.is_file()})

    def _check_folder(self, run_path: Path) -> None:
        """Refuse an --out that is a file, or a non-empty folder that is not one of our runs: we would
        overwrite the user's files there (say a pairs.jsonl) or mix ours among them."""
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"--out {self.out} is a file; pass a folder (new or empty, or a previous run's)")
        if run_path.is_file() or not self.out.is_dir():
            return
        stale = set(self._stale_temp_files())  # e.g. a run.json temp file: killed before run.json existed
        foreign = sorted(p.name for p in self.out.iterdir() if p not in stale)
        if foreign:
            listed = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise UserError(f"--out {self.out} is not empty ({listed}) and holds no `{self.command}` run "
                            f"({RUN_FILE}); pass a new or empty folder as --out, so that no file of yours is "
                            f"overwritten")

    def start(self) -> None:
        """Main process only: record the command and settings (first: from then on the folder is ours), create
        folders, delete half-written temp files of our own outputs."""
        from diffusion_dpo.runtime import write_text_atomic

        self.out.mkdir(parents=True, exist_ok=True)
        if not self._run_path.is_file():
            write_text_atomic(self._run_path, json.dumps({"command": self.command, "num_items": self.num_items,
                                                          "chunk_size": self.chunk_size, "settings": self.settings},
                                                         indent=1, sort_keys=True), fsync=False)
        self.chunk_dir.mkdir(exist_ok=True)
        for stale in self._stale_temp_files():
            stale.unlink()

    def bounds(self, k: int) -> range:
        return range(k * self.chunk_size, min((k + 1) * self.chunk_size, self.num_items))

    def path(self, k: int) -> Path:
        return self.chunk_dir / f"chunk-{k:05d}.json"

    def done(self) -> set[int]:
        return {k for k in range(self.num_chunks) if self.path(k).is_file()}

    def todo(self) -> list[int]:
        """This process's unfinished chunks."""
        done = self.done()
        return [k for k in range(self.num_chunks) if k % self.world_size == self.rank and k not in done]

    def write(self, k: int, result: dict) -> None:
        from diffusion_dpo.runtime import write_text_atomic

        write_text_atomic(self.path(k), json.dumps(result, sort_keys=True), fsync=False)
        self._written += 1
        fail_after = os.environ.get(FAIL_ENV)
        if fail_after and self._written >= int(fail_after):
            raise InjectedFailure(f"{FAIL_ENV}={fail_after}: stopping after {self._written} chunk(s) (test hook)")

    def results(self) -> list[dict]:
        """Every chunk's result, in chunk order (main process, after all are done)."""
        missing = sorted(set(range(self.num_chunks)) - self.done())
        if missing:
            raise RuntimeError(f"{self.chunk_dir}: chunks {missing[:5]} are missing after every process finished")
        return [json.loads(self.path(k).read_text()) for k in range(self.num_chunks)]
