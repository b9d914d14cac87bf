"""Run a prompt set through `Session`, one item after another, into a run folder.

    RUN/manifest.json   what ran: model and config hash, package versions, device, dtype, prompt file hash, times
    RUN/results.jsonl   one line per finished item (status "ok" or "error"); a rerun skips the "ok" ones
    RUN/summary.json    aggregate scores of the items with ground truth
    RUN/items/<id>/     overlay.png or overlay.mp4

Items are grouped by media: the media is loaded once and its features (a `MediaCache`) handed from
one item's session to the next. Scores are computed on the sampled frames that have ground truth, or,
with `track_source_frames`, on every annotated source frame (masks tracked through the source
frames, the LLM reading the sampled ones, as the authors' evaluation does).
"""
from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import UniPixelError
from .export import export_overlay, playback_fps
from .media import DEFAULT_MAX_TRACKED_FRAMES, load_media
from .memory import rle_encode_stack
from .metrics import aggregate, score_masks
from .promptset import BadItem, PromptItem, ground_truth_masks, read_prompt_set, source_ground_truth, visual_prompt
from .session import Session

PACKAGES = ("unipixel-playground", "torch", "transformers", "sam2", "numpy", "pycocotools", "gradio")
Report = Callable[[str], None]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict:
    versions = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def item_folder(item_id: str) -> str:
    """A file-system-safe folder name for an item id, distinct for distinct ids."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", item_id)[:80]
    return safe if safe == item_id else f"{safe}-{hashlib.sha1(item_id.encode()).hexdigest()[:8]}"


def read_results(run: str | Path) -> dict[str, dict]:
    """Each item's latest record in RUN/results.jsonl; a line cut short by a killed run is ignored."""
    path = Path(run) / "results.jsonl"
    records = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            records[record["id"]] = record
    return records


def _open_results(path: Path):
    """results.jsonl for appending, without the partial last line a killed run may have left."""
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            path.write_bytes(data[: data.rfind(b"\n") + 1])
    return path.open("a")


def _write_line(stream, record: dict) -> None:
    stream.write(json.dumps(record) + "\n")
    stream.flush()
    os.fsync(stream.fileno())  # a killed run loses at most the item in progress


def make_manifest(prompt_file: Path, model, model_path: str) -> dict:
    config = Path(model_path) / "config.json"
    return {
        "model": model_path,
        "config_sha256": _sha256(config) if config.is_file() else None,
        "packages": _versions(),
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "prompt_file": str(prompt_file),
        "prompt_sha256": _sha256(prompt_file),
        "start_time": _now(),
        "end_time": None,
    }


def _check_same_run(old: dict, new: dict) -> None:
    for key, what in (("prompt_sha256", "prompt file"), ("config_sha256", "model config")):
        if old.get(key) != new.get(key):
            raise UniPixelError(f"this run folder holds results of another {what}: give a new --out to start a new run")
    if old.get("track_source_frames", False) != new.get("track_source_frames", False):
        raise UniPixelError("this run folder holds results of the other --track-source-frames setting: "
                            "give a new --out to start a new run")  # fmt: skip


def _object_record(obj) -> dict:
    record = {"id": obj.id, "name": obj.name, "source": obj.source, "span": obj.span,
              "masks": rle_encode_stack(obj.masks)}  # fmt: skip
    if obj.track is not None:
        record["track"] = obj.track.to_json()  # RLE per tracked source frame
    return record


def score_turn(truth, obj, session: Session) -> dict:
    """The score of a turn's object (None: the answer segmented nothing) against its ground truth:
    on the annotated sampled frames, or on every annotated tracked source frame when the session
    tracks masks through the source frames."""
    media = session.media
    if session.track_plan is None:
        frames, gt = ground_truth_masks(truth, media)
        pred = obj.masks[frames] if obj is not None else np.zeros_like(gt)
        return {**score_masks(pred, gt, media.kind).to_json(), "frames": frames}
    sources, gt = source_ground_truth(truth, media)
    tracked = set(session.track_plan.frame_indices)
    keep = [i for i, s in enumerate(sources) if s in tracked]
    sources, gt = [sources[i] for i in keep], gt[keep]
    pred = obj.track.masks([obj.track.position(s) for s in sources]) if obj is not None else np.zeros_like(gt)
    return {**score_masks(pred, gt, media.kind).to_json(), "source_frames": sources}


def run_item(item: PromptItem, session: Session) -> dict:
    """Every turn of `item` in `session`: answers, new objects' masks (RLE per sampled frame), scores."""
    turns = []
    for k, turn in enumerate(item.turns):
        start = time.perf_counter()
        if "object" in turn:
            objects = [session.add_object(visual_prompt(turn["object"]), name=turn["name"])]
            record = {"object": {**turn["object"], "mask": str(turn["object"].get("mask", "")) or None}}
        else:
            result = session.ask(turn["question"])
            objects = result.new_objects
            record = {"question": turn["question"], "answer": result.answer, "raw_answer": result.raw_answer}
        record["objects"] = [_object_record(o) for o in objects]
        record["seconds"] = round(time.perf_counter() - start, 3)
        if k in item.ground_truth:
            record["score"] = score_turn(item.ground_truth[k], objects[0] if objects else None, session)
        turns.append(record)
    return {"turns": turns}


def item_score(record: dict) -> float | None:
    """One number per item for sorting: mean IoU (images) or J&F (videos) over its scored turns."""
    scores = [t["score"] for t in record.get("turns", []) if "score" in t]
    return float(np.mean([s.get("iou", s.get("jf")) for s in scores])) if scores else None


def summarize(records: dict[str, dict]) -> dict:
    ok = [r for r in records.values() if r["status"] == "ok"]
    scores = [t["score"] for r in ok for t in r["turns"] if "score" in t]
    return {"items": len(records), "ok": len(ok), "errors": len(records) - len(ok), "scores": aggregate(scores)}


def _media_groups(items: list[PromptItem]) -> dict[tuple[Path, int], list[PromptItem]]:
    groups: dict[tuple[Path, int], list[PromptItem]] = {}
    for item in items:
        groups.setdefault((item.media.resolve(), item.num_frames), []).append(item)
    return groups


def run_batch(
    prompt_file: str | Path,
    model,
    processor,
    out_dir: str | Path,
    *,
    model_path: str,
    max_new_tokens: int = 512,
    default_frames: int = 16,
    report: Report = lambda text: print(text, file=sys.stderr),
    progress: bool = True,
    track_source_frames: bool = False,
    max_tracked_frames: int = DEFAULT_MAX_TRACKED_FRAMES,
) -> dict:
    """Run every unfinished item of the prompt set; returns the summary (also in RUN/summary.json).
    `track_source_frames`: masks through the source frames, scored on every annotated one."""
    from tqdm import tqdm

    prompt_file, out = Path(prompt_file), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = make_manifest(prompt_file, model, model_path)
    manifest["track_source_frames"] = track_source_frames
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        _check_same_run(old, manifest)
        manifest["start_time"] = old["start_time"]
    manifest_path.write_text(json.dumps(manifest, indent=2))

    done = {i for i, r in read_results(out).items() if r["status"] == "ok"}
    entries = [e for e in read_prompt_set(prompt_file, default_frames) if e.id not in done]
    bar = tqdm(total=len(entries), desc="items", unit="item", file=sys.stderr, disable=not progress)
    with _open_results(out / "results.jsonl") as results:

        def finish(record: dict) -> None:
            if record["status"] == "error":
                report(f"skipped {record['id']}: {record['error']}")
            _write_line(results, record)
            bar.update()

        for bad in (e for e in entries if isinstance(e, BadItem)):
            where = "" if bad.id == f"line {bad.line}" else f"line {bad.line}: "
            finish(_error(bad.id, where + bad.error))
        for (path, frames), group in _media_groups([e for e in entries if isinstance(e, PromptItem)]).items():
            start = time.perf_counter()
            try:
                media = load_media(path, num_frames=frames)
            except UniPixelError as err:
                for item in group:
                    finish(_error(item.id, str(err)))
                continue
            media_seconds, cache = round(time.perf_counter() - start, 3), None
            for item in group:
                bar.set_postfix_str(item.id)
                session = Session(model, processor, media, max_new_tokens=max_new_tokens,
                                  track_source_frames=track_source_frames, max_tracked_frames=max_tracked_frames)
                session.cache = cache  # the media's features, computed by the first item on it
                finish(_item_record(item, session, out, media_seconds))
                cache = session.cache
    bar.close()

    summary = summarize(read_results(out))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    manifest["end_time"] = _now()
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return summary


def _error(item_id: str, error: str) -> dict:
    return {"id": item_id, "status": "error", "error": error}


def _item_record(item: PromptItem, session: Session, out: Path, media_seconds: float) -> dict:
    """The item run in `session`, with its overlay written: its results.jsonl record."""
    start, media = time.perf_counter(), session.media
    try:
        record = run_item(item, session)
        folder = out / "items" / item_folder(item.id)
        overlay = export_overlay(media.frames, session.bank, folder, fps=playback_fps(media), source=media)
    except UniPixelError as err:
        return _error(item.id, str(err))
    record = {
        "id": item.id,
        "status": "ok",
        "media": str(item.media.resolve()),  # absolute: the item can be opened again from anywhere (unipixel.reopen)
        "kind": media.kind,
        "frame_indices": media.frame_indices,
        "size": [media.height, media.width],
        **record,
        "overlay": str(overlay.relative_to(out)),
        "score": None,
        "seconds": round(time.perf_counter() - start, 3),
        "media_seconds": media_seconds,  # loading the media, shared by the items on it
    }
    record["score"] = item_score(record)
    return record
