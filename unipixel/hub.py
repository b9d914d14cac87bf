"""Find the model to run: a local folder, the hub cache, the hub (briefly), else the offline model."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError

DEFAULT_MODEL = "PolyU-ChenLab/UniPixel-3B"
OFFLINE_MODEL = "offline-tiny"
HUB_TIMEOUT_S = 5.0  # a user waits for this at most before the offline fallback
# A small UniPixel trained on synthetic shape scenes (unipixel/train); the offline model when shipped.
SHAPES_CHECKPOINT = Path(__file__).resolve().parent.parent / "assets" / "unipixel-shapes"


@dataclass
class ResolvedModel:
    path: str
    offline: bool  # True when the offline tiny model stands in for the requested one
    reason: str | None = None  # why the requested model could not be used


def offline_checkpoint_dir() -> Path:
    root = Path(os.environ.get("UNIPIXEL_CACHE", Path.home() / ".cache" / "unipixel"))
    return root / "tiny-seed0"


def offline_checkpoint() -> str:
    """Path of the offline model: the trained shapes checkpoint shipped in `assets/unipixel-shapes`
    when present (it knows colored shapes only), else the random tiny checkpoint, built on first
    use (a few seconds, no network)."""
    if (SHAPES_CHECKPOINT / "config.json").exists():
        return str(SHAPES_CHECKPOINT)
    from .model.tiny import build_tiny_checkpoint

    path = offline_checkpoint_dir()
    if not (path / "config.json").exists():
        build_tiny_checkpoint(path, seed=0)
    return str(path)


def resolve_model(name_or_path: str | None = None) -> ResolvedModel:
    """Local folder > hub cache > hub download (short timeouts) > offline tiny model."""
    name = os.path.expanduser(name_or_path or DEFAULT_MODEL)
    if name == OFFLINE_MODEL:
        return ResolvedModel(offline_checkpoint(), offline=True)
    if Path(name).is_dir():
        return ResolvedModel(name, offline=False)
    if Path(name).is_absolute() or name.startswith("."):  # clearly a path: never try it as a hub id
        raise CheckpointError(f"no checkpoint folder at {name!r}")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(HUB_TIMEOUT_S)))
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(int(HUB_TIMEOUT_S)))
    from huggingface_hub import snapshot_download

    try:
        return ResolvedModel(snapshot_download(name, local_files_only=True), offline=False)
    except Exception:  # not cached: try the hub below
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        reason = f"{name} is not in the local cache and HF_HUB_OFFLINE is set"
        return ResolvedModel(offline_checkpoint(), offline=True, reason=reason)
    try:
        return ResolvedModel(snapshot_download(name, etag_timeout=HUB_TIMEOUT_S), offline=False)
    except Exception as e:  # no network, unknown repo, gated: the offline model keeps the app usable
        reason = f"{name} could not be downloaded ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        return ResolvedModel(offline_checkpoint(), offline=True, reason=reason)
