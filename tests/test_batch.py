"""Prompt sets through `run_batch` and the CLI on the tiny checkpoint: results, scores, resume,
bad items, shared features per media, and the side-by-side report."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unipixel.batch import read_results, run_batch
from unipixel.cli import main
from unipixel.compare import pair_runs, write_report
from unipixel.media import load_media
from unipixel.memory import rle_decode, rle_encode
from unipixel.promptset import BadItem, read_prompt_set

ASSETS = Path(__file__).resolve().parents[1] / "assets"
VIDEO_FRAMES = 3


@pytest.fixture
def prompt_set(tmp_path):
    """Two image items (one with a RLE ground truth), two video items on one video (a PNG-folder
    ground truth), and four bad ones: missing media, bad JSON, a duplicate id, a point off the frame."""
    shutil.copy(ASSETS / "shapes.png", tmp_path / "shapes.png")
    shutil.copy(ASSETS / "moving_shapes.mp4", tmp_path / "clip.mp4")
    image = np.asarray(Image.open(tmp_path / "shapes.png"))
    square = np.zeros(image.shape[:2], bool)
    square[40:90, 60:120] = True
    video = load_media(tmp_path / "clip.mp4", VIDEO_FRAMES)
    (tmp_path / "gt").mkdir()
    for source in video.frame_indices[:2]:  # the last sampled frame is not annotated
        Image.fromarray(square.astype(np.uint8) * 255).resize((video.width, video.height)).save(tmp_path / "gt" / f"{source:05d}.png")
    Image.fromarray(square.astype(np.uint8) * 255).save(tmp_path / "brush.png")
    items = [
        {"id": "image-ask", "media": "shapes.png", "turns": [{"question": "Please segment the red circle."}],
         "ground_truth": {"0": [rle_encode(square)]}},
        {"id": "image-box", "media": "shapes.png", "turns": [
            {"object": {"kind": "box", "frame": 0, "box": [60, 40, 120, 90]}, "name": "box"},
            {"object": {"kind": "mask", "frame": 0, "mask": "brush.png"}},
            {"question": "What color is [1]?"}], "ground_truth": {"1": [rle_encode(square)]}},
        {"id": "video-ask", "media": "clip.mp4", "num_frames": VIDEO_FRAMES,
         "turns": [{"question": "Please segment the blue square."}], "ground_truth": {"0": "gt"}},
        {"id": "video-point", "media": "clip.mp4", "num_frames": VIDEO_FRAMES,
         "turns": [{"object": {"kind": "point", "frame": 1, "points": [[50, 60, 1], [52, 61, 0]]}}]},
        {"id": "missing", "media": "nope.mp4", "turns": [{"question": "Hi"}]},
        {"id": "off-frame", "media": "shapes.png", "turns": [{"object": {"kind": "point", "points": [[5000, 1, 1]]}}]},
        {"id": "image-ask", "media": "shapes.png", "turns": [{"question": "again"}]},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items) + "{not json\n")
    return path


def test_read_prompt_set_reports_bad_lines_with_their_id(prompt_set):
    entries = read_prompt_set(prompt_set)
    bad = {e.id: e.error for e in entries if isinstance(e, BadItem)}
    assert set(bad) == {"missing", "line 7", "line 8"}
    assert "does not exist" in bad["missing"] and "'image-ask' is used by an earlier item" in bad["line 7"]
    good = [e for e in entries if not isinstance(e, BadItem)]
    assert good[1].ground_truth[1][0]["size"] == [240, 320] and good[2].ground_truth[0].name == "gt"


@pytest.fixture
def run(tiny_model, prompt_set, tmp_path, monkeypatch):
    model, processor = tiny_model
    encoded = []
    encode_video = model.encode_video
    monkeypatch.setattr(model, "encode_video", lambda *a, **k: encoded.append(1) or encode_video(*a, **k))
    out = tmp_path / "run"
    summary = run_batch(prompt_set, model, processor, out, model_path="tiny", max_new_tokens=8, progress=False)
    return out, summary, encoded


def test_batch_writes_results_overlays_scores_and_manifest(run, prompt_set):
    out, summary, encoded = run
    records = read_results(out)
    assert {i for i, r in records.items() if r["status"] == "ok"} == {"image-ask", "image-box", "video-ask", "video-point"}
    assert "outside" in records["off-frame"]["error"] and "nope.mp4" in records["missing"]["error"]
    assert len(encoded) == 2  # one encoding per media: items on the same media share its features

    box = records["image-box"]
    assert [t.get("question") for t in box["turns"]] == [None, None, "What color is [1]?"]
    brush = box["turns"][1]
    assert brush["score"]["iou"] == 1.0 and brush["score"]["frames"] == [0]  # the brush mask is the ground truth
    assert (rle_decode(brush["objects"][0]["masks"][0]) == rle_decode(box["turns"][1]["objects"][0]["masks"][0])).all()
    assert box["score"] == 1.0 and (out / box["overlay"]).name == "overlay.png"

    video = records["video-ask"]
    assert len(video["frame_indices"]) == VIDEO_FRAMES and video["kind"] == "video"
    assert video["turns"][0]["score"]["frames"] == [0, 1] and {"j", "f", "jf"} <= set(video["turns"][0]["score"])
    assert (out / video["overlay"]).suffix == ".mp4" and all(t["seconds"] >= 0 for t in video["turns"])
    for obj in records["video-point"]["turns"][0]["objects"]:
        assert len(obj["masks"]) == VIDEO_FRAMES

    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["ok"] == 4 and summary["errors"] == 4
    assert summary["scores"]["images"]["count"] == 2 and summary["scores"]["videos"]["count"] == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == "tiny" and manifest["device"] == "cpu" and manifest["dtype"] == "float32"
    assert {"torch", "transformers", "python"} <= set(manifest["packages"]) and manifest["end_time"]
    assert len(manifest["prompt_sha256"]) == 64


def test_batch_resumes_after_a_killed_run(run, tiny_model, prompt_set):
    out, _, encoded = run
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    video_point = next(i for i, line in enumerate(lines) if '"video-point"' in line)
    # Killed while writing video-point's line: it is cut short.
    (out / "results.jsonl").write_text("".join(lines[:video_point]) + lines[video_point][:40])
    encoded.clear()
    summary = run_batch(prompt_set, *tiny_model, out, model_path="tiny", max_new_tokens=8, progress=False)
    assert summary["ok"] == 4 and len(encoded) == 1  # only video-point ran again (and the bad items)
    rerun = [json.loads(line)["id"] for line in (out / "results.jsonl").read_text().splitlines()[video_point:]]
    assert "video-point" in rerun and "image-ask" not in rerun

    prompt_set.write_text(prompt_set.read_text() + "\n")  # another prompt file: not the same run
    assert main(["batch", str(prompt_set), "--model", "/no/such/model", "--out", str(out)]) == 2


def test_compare_pairs_items_and_writes_one_html_file(run, tmp_path):
    out, _, _ = run
    other = tmp_path / "other"
    shutil.copytree(out, other)
    records = read_results(other)
    records["image-box"]["score"] = 0.25  # B scores lower on one item
    (other / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records.values()))
    pairs = pair_runs(out, other)
    assert pairs[0].id == "image-box" and pairs[0].difference == pytest.approx(-0.75)
    assert pairs[1].difference == 0.0 and pairs[-1].difference is None

    report = write_report(out, other, tmp_path / "report.html")
    page = report.read_text()
    assert page.index("image-box") < page.index("video-ask") and "-0.750" in page
    assert "data:image/png;base64," in page and "data:video/mp4;base64," in page and "What color is [1]?" in page
    assert "src=\"http" not in page and "href=" not in page  # self-contained


def test_cli_batch_and_compare(tiny_checkpoint, prompt_set, tmp_path, capsys):
    out = tmp_path / "cli-run"
    assert main(["batch", str(prompt_set), "--model", str(tiny_checkpoint), "--out", str(out),
                 "--device", "cpu", "--max-new-tokens", "8"]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert summary["ok"] == 4 and (out / "manifest.json").is_file()
    assert main(["compare", str(out), str(out), "--html", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").stat().st_size > 1000
    assert main(["compare", str(out), str(tmp_path), "--html", str(tmp_path / "x.html")]) == 2
