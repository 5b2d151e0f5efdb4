"""runtime: one answer for offline mode, dtype names and atomic writes."""

from __future__ import annotations

import pytest
import torch

from diffusion_dpo import runtime
from diffusion_dpo.errors import ConfigError


@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("ON", True), ("0", False), ("", False),
                                            ("no", False)])
def test_hub_offline_reads_the_values_huggingface_hub_accepts(monkeypatch, value, expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert runtime.hub_offline() is expected


def test_dtype_names_and_aliases():
    assert runtime.torch_dtype("bf16") is torch.bfloat16 and runtime.torch_dtype("float16") is torch.float16
    assert runtime.torch_dtype(torch.float32) is torch.float32
    with pytest.raises(ConfigError, match="model.frozen_dtype must be one of float32, float16, bfloat16, got 'int8'"):
        runtime.torch_dtype("int8", "model.frozen_dtype")


def test_atomic_write_replaces_whole_files_and_leaves_nothing_on_error(tmp_path):
    path = tmp_path / "a.json"
    runtime.write_json_atomic(path, {"x": 1})
    assert path.read_text() == '{\n "x": 1\n}'
    with pytest.raises(RuntimeError):
        with runtime.atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert path.read_text() == '{\n "x": 1\n}'  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # and no temp file is left
