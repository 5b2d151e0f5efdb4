"""`diffusion-dpo train` on data that cannot fill one batch: one line, exit 2, before any model weights load."""

from __future__ import annotations

import pytest

from diffusion_dpo.cli import main
from diffusion_dpo.data.synthetic import write_manifest, write_pickapic_parquet


def _train(tmp_path, model, source, *extra: str) -> int:
    return main(["train", f"model.pretrained={model}", f"data.source={source}", "data.resolution=32",
                 "train.max_steps=1", "output.report_to=none", f"output.dir={tmp_path / 'run'}", *extra])


@pytest.fixture
def no_model_loads(monkeypatch):
    """Make loading the VAE or the trained network fail loudly (every family loads through ModelFamily):
    the data checks must come first."""
    from diffusion_dpo.models.families import ModelFamily

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(ModelFamily, "load_vae", refuse)
    monkeypatch.setattr(ModelFamily, "load_network", refuse)


@pytest.mark.fault(input="`train` with fewer pairs than `train.batch_size` x processes (or every row a tie)",
                   behaviour="exit 2 before any model loads: one line naming the counts and the fix")
def test_too_few_pairs_stop_before_the_models_load(tmp_path, tiny_sd, no_model_loads, capsys):
    assert _train(tmp_path, tiny_sd, write_manifest(tmp_path / "m", 3), "train.batch_size=4") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "3 pairs (3 rows read, 0 ties dropped, 0 beyond data.max_pairs) cannot fill one " \
        "micro-batch of train.batch_size 4 x 1 process(es) = 4 pairs" in err
    ties = write_pickapic_parquet(tmp_path / "ties.parquet", n=0, ties=2)
    assert _train(tmp_path, tiny_sd, ties) == 2
    err = capsys.readouterr().err  # datasets' progress bar comes first
    assert "Traceback" not in err and "every one of its 2 rows is a tie" in err.splitlines()[-1]
