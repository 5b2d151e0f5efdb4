"""Keep the Arrow copies that `datasets` makes of test parquet files out of the user's cache."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf_datasets_cache")
