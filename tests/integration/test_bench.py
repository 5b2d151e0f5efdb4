"""`diffusion-dpo bench --arch tiny` end to end (a smoke test: no timing assertions)."""

from __future__ import annotations

import json

from diffusion_dpo.cli import main


def test_bench_tiny_runs_every_variant(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--arch", "tiny", "--steps", "1", "--warmup", "1", "--threads", "1",
                 "--workdir", str(tmp_path / "work"), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for line in ("(a) ours", "(b) ours", "(c) official", "(d) bare minimum", "a/c pairs/s", "a/d pairs/s",
                 "a/b peak memory"):
        assert line in text
    results = json.loads(out.read_text())
    assert sorted(results["results"]) == ["a", "b", "c", "d"]
    for r in results["results"].values():
        assert r["pairs_per_s"] > 0 and r["peak_mem_mb"] > 0 and r["gflop_per_step"] > 0


def test_bench_gradient_checkpointing_counts_model_and_recomputed_flops(tmp_path, capsys):
    """The GPU recipe's flags (sdxl: LoRA + gradient checkpointing, bf16, channels_last) run on CPU too; MFU
    must count model FLOPs, so the recomputed forward is reported separately and only there."""
    runs = {}
    for name, extra in (("plain", []), ("ckpt", ["--gradient-checkpointing"])):
        out = tmp_path / f"{name}.json"
        assert main(["bench", "--arch", "tiny", "--steps", "1", "--warmup", "1", "--threads", "1", "--variants", "ac",
                     "--mixed-precision", "bf16", "--channels-last", *extra,
                     "--workdir", str(tmp_path / "work"), "--json", str(out)]) == 0
        runs[name] = json.loads(out.read_text())["results"]
    assert "run with recomputation" in capsys.readouterr().out
    for v in "ac":
        plain, ckpt = runs["plain"][v], runs["ckpt"][v]
        assert plain["hw_gflop_per_step"] == plain["gflop_per_step"]
        assert abs(ckpt["gflop_per_step"] / plain["gflop_per_step"] - 1) < 1e-6  # same model FLOPs
        assert ckpt["hw_gflop_per_step"] > 1.1 * ckpt["gflop_per_step"]  # the blocks' forward ran twice
