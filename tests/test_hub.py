"""Model resolution: local folders, clear errors for missing paths, a fast offline fallback."""
import time
from pathlib import Path

import pytest

from unipixel import CheckpointError
from unipixel.hub import resolve_model


@pytest.fixture
def offline_cache(tmp_path, monkeypatch, tiny_checkpoint):
    # The offline model's cache dir points at the session's tiny checkpoint: nothing is rebuilt.
    (tmp_path / "tiny-seed0").symlink_to(tiny_checkpoint, target_is_directory=True)
    monkeypatch.setenv("UNIPIXEL_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_a_local_folder_is_used_as_is(tiny_checkpoint):
    resolved = resolve_model(str(tiny_checkpoint))
    assert resolved.path == str(tiny_checkpoint) and not resolved.offline


def test_a_missing_local_path_is_an_error_not_a_hub_id(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        resolve_model(str(tmp_path / "nothing-here"))
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        resolve_model("./nothing-here")


def test_an_unreachable_hub_model_falls_back_to_the_offline_model_quickly(offline_cache):
    start = time.perf_counter()
    resolved = resolve_model("PolyU-ChenLab/UniPixel-3B")
    assert time.perf_counter() - start < 5
    assert resolved.offline and "PolyU-ChenLab/UniPixel-3B" in resolved.reason
    assert Path(resolved.path, "config.json").exists()
