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
