"""AI feedback: re-judge the pairs of any supported dataset with a reward model, once, before training.

    source = open_source(DataConfig(source="pickapic/train-*.parquet"))
    result = label_pairs(source, load_judge(["pickscore"]), "data/pickapic_pickscore", margin=0.0)
    # then train with data.source=data/pickapic_pickscore/pairs.jsonl

Both images of every pair are scored (batched, by the reward's own batch size); the higher score becomes
`chosen`. Pairs whose score difference is below `margin` (or exactly zero) are dropped as ties and counted.
The agreement rate is the fraction of kept pairs whose new winner is the original dataset's winner.

Output (the toolkit's manifest format; `open_source` reads it with data.format=manifest or auto):

    <out>/pairs.jsonl      one kept pair a line: prompt, chosen, rejected (paths relative to this file),
                           score_chosen, score_rejected, margin, original_label (1: the original data also
                           preferred `chosen`, 0: the label was flipped), key, source_index, source_meta,
                           and scores_chosen / scores_rejected per member for an ensemble
    <out>/images/<chunk>/  both images of each kept pair, the ORIGINAL encoded bytes (JPEG stays JPEG:
                           no re-encoding loss), named <source_index>_chosen.<ext> / _rejected.<ext>
    <out>/label_summary.json  counts, agreement, the judge's info (model, version, scale)
    <out>/run.json, chunks/   resumable bookkeeping (feedback.chunks)
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from diffusion_dpo.errors import CorruptImageError, UserError
from diffusion_dpo.feedback.chunks import ChunkedRun, dumps_jsonl

log = logging.getLogger("diffusion_dpo")

MANIFEST = "pairs.jsonl"
SUMMARY = "label_summary.json"
# what label writes into --out besides run.json and chunks/ (for the clean-up of stale temp files)
OUTPUTS = (MANIFEST, SUMMARY, "images/[0-9]*/[0-9]*_chosen.*", "images/[0-9]*/[0-9]*_rejected.*")
_EXT = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


@dataclass
class LabelResult:
    manifest: Path
    pairs_in: int
    kept: int
    ties_dropped: int
    corrupt_skipped: int
    agreed: int

    @property
    def agreement(self) -> float | None:
        """Fraction of kept pairs whose new winner is the original winner (None when nothing was kept)."""
        return self.agreed / self.kept if self.kept else None


def _raw_bytes(ref: Any) -> bytes:
    return ref if isinstance(ref, bytes) else Path(ref).read_bytes()


def _extension(data: bytes) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return _EXT.get(img.format or "", ".img")


def label_chunk(source: Any, indices: range, judge: Any, margin: float, out: Path, chunk: int,
                on_corrupt: str = "skip") -> dict:
    """Judge the pairs `indices` of `source`; write the kept pairs' images; return the chunk's rows and counts."""
    from diffusion_dpo.data.dataset import decode_image
    from diffusion_dpo.runtime import write_bytes_atomic

    pairs, corrupt = [], 0
    for i in indices:
        record = source[i]
        try:
            raw = (_raw_bytes(record.chosen), _raw_bytes(record.rejected))
            images = (decode_image(raw[0], f"{record.key} (chosen)"), decode_image(raw[1], f"{record.key} (rejected)"))
        except (CorruptImageError, OSError) as err:
            if on_corrupt == "error":
                raise CorruptImageError(f"pair {i} ({record.key}): {err}. Pass --on-corrupt skip to skip and count such pairs.") from err
            log.warning("skipping pair %d (%s): %s", i, record.key, err)
            corrupt += 1
            continue
        pairs.append((i, record, raw, images))
    rows, ties, agreed = [], 0, 0
    if pairs:
        prompts = [r.prompt for _, r, _, _ in pairs]
        # one call for all first images then all second ones: the reward batches internally
        total, parts = judge.score([im[0] for *_, im in pairs] + [im[1] for *_, im in pairs], prompts + prompts)
        n = len(pairs)
        folder = out / "images" / f"{chunk:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for j, (i, record, raw, _) in enumerate(pairs):
            s_orig_w, s_orig_l = float(total[j]), float(total[n + j])
            diff = abs(s_orig_w - s_orig_l)
            if diff == 0.0 or diff < margin:
                ties += 1
                continue
            keep_order = s_orig_w > s_orig_l  # the original winner stays the winner
            w, l = (0, 1) if keep_order else (1, 0)
            agreed += keep_order
            files = []
            for side, idx in (("chosen", w), ("rejected", l)):
                path = folder / f"{i:08d}_{side}{_extension(raw[idx])}"
                write_bytes_atomic(path, raw[idx], fsync=False)
                files.append(path.relative_to(out).as_posix())
            row = {"prompt": record.prompt, "chosen": files[0], "rejected": files[1],
                   "score_chosen": max(s_orig_w, s_orig_l), "score_rejected": min(s_orig_w, s_orig_l), "margin": diff,
                   "original_label": int(keep_order), "key": record.key, "source_index": i,
                   "source_meta": _jsonable(record.meta)}
            if len(parts) > 1:
                row["scores_chosen"] = {name: float(s[j if keep_order else n + j]) for name, s in parts.items()}
                row["scores_rejected"] = {name: float(s[n + j if keep_order else j]) for name, s in parts.items()}
            rows.append(row)
    return {"rows": rows, "ties": ties, "corrupt": corrupt, "agreed": agreed, "pairs_in": len(indices)}


def _jsonable(meta: dict) -> dict:
    out = {}
    for k, v in meta.items():
        if isinstance(v, bytes):
            continue
        try:
            json.dumps(v)
        except TypeError:
            v = str(v)
        out[k] = v
    return out


def label_pairs(source: Any, judge: Any, out: str | os.PathLike, margin: float = 0.0, chunk_size: int = 256,
                on_corrupt: str = "skip", dist: Any = None, progress: bool = True) -> LabelResult | None:
    """Re-judge every pair of `source` (a data.sources.PairSource) with `judge` (feedback.reward_judge.Judge)
    into `out`.

    Resumable (finished chunks are skipped) and shardable across processes (`dist`: a runtime.ProcessInfo,
    default a single process). Returns the result on the main process, None on the others.
    """
    from tqdm.auto import tqdm

    from diffusion_dpo.runtime import ProcessInfo, write_text_atomic

    if margin < 0:
        raise UserError(f"--margin must be >= 0, got {margin}")
    dist = dist or ProcessInfo()
    out = Path(out)
    settings = {"source": source.fingerprint, "source_location": source.location, "judge": judge.names,
                "weights": judge.weights, "margin": margin, "on_corrupt": on_corrupt}
    run = ChunkedRun(out, len(source), chunk_size, settings, dist.rank, dist.world_size, command="label",
                     outputs=OUTPUTS)
    if dist.rank == 0:
        run.start()
    dist.barrier()
    todo = run.todo()
    bar = tqdm(total=sum(len(run.bounds(k)) for k in todo), unit="pair", disable=not progress, dynamic_ncols=True,
               desc=f"label [{dist.rank}]" if dist.world_size > 1 else "label")
    t0 = time.perf_counter()
    for k in todo:
        run.write(k, label_chunk(source, run.bounds(k), judge, margin, out, k, on_corrupt))
        bar.update(len(run.bounds(k)))
    bar.close()
    elapsed = time.perf_counter() - t0
    dist.barrier()
    if dist.rank != 0:
        return None
    chunks = run.results()
    rows = [r for c in chunks for r in c["rows"]]
    result = LabelResult(out / MANIFEST, len(source), len(rows), sum(c["ties"] for c in chunks),
                         sum(c["corrupt"] for c in chunks), sum(c["agreed"] for c in chunks))
    write_text_atomic(out / MANIFEST, dumps_jsonl(rows), fsync=False)
    summary = {**{k: v for k, v in asdict(result).items() if k != "manifest"}, "agreement": result.agreement,
               "margin": margin, "source": source.describe(), "judge": judge.info,
               "manifest": MANIFEST, "format": "manifest (data.format=manifest): prompt, chosen, rejected + scores"}
    write_text_atomic(out / SUMMARY, json.dumps(summary, indent=1, sort_keys=True), fsync=False)
    done_now = sum(len(run.bounds(k)) for k in todo)
    log.info("labelled %d pairs in %.1f s this run", done_now, elapsed)
    return result


def describe(result: LabelResult) -> str:
    agreement = "n/a (no pairs kept)" if result.agreement is None else f"{100 * result.agreement:.1f}%"
    return (f"label: {result.pairs_in} pairs judged -> {result.kept} kept, {result.ties_dropped} dropped as ties "
            f"(score margin below threshold), {result.corrupt_skipped} corrupt skipped; agreement with the original "
            f"labels: {agreement} ({result.agreed}/{result.kept}, {result.kept - result.agreed} flipped) -> {result.manifest}")
