"""`python -m unipixel` on the tiny checkpoint: run as a user runs it (subprocess), and in process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image, ImageDraw

from unipixel.cli import build_parser, format_answer, group_prompts, main
from unipixel.media import load_media
from unipixel.memory import ObjectMemoryBank, rle_decode
from unipixel.session import Target, TurnResult

ROOT = Path(__file__).resolve().parent.parent
W, H = 160, 120


def run_cli(*args: str, tmp_path: Path, progress: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "UNIPIXEL_CACHE": str(tmp_path / "cache")}
    if progress:
        env.pop("TQDM_DISABLE", None)
    else:
        env["TQDM_DISABLE"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "unipixel", *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    done = run_cli("tiny", str(root / "tiny"), "--seed", "0", tmp_path=root)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(root / "tiny")
    assert {"config.json", "model.safetensors.index.json", "preprocessor_config.json"} <= {p.name for p in (root / "tiny").iterdir()}
    return root / "tiny"


@pytest.fixture(scope="module")
def circle_png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("media") / "circle.png"
    image = Image.new("RGB", (W, H), (240, 240, 240))
    ImageDraw.Draw(image).ellipse((40, 30, 100, 90), fill=(220, 30, 30))
    image.save(path)
    return path


@pytest.fixture(scope="module")
def clip_mp4(tmp_path_factory) -> Path:
    """10 frames of 96x64: a blue square moving right."""
    path = tmp_path_factory.mktemp("media") / "clip.mp4"
    writer = imageio_ffmpeg.write_frames(str(path), (96, 64), fps=8, macro_block_size=1, ffmpeg_log_level="error")
    writer.send(None)
    for t in range(10):
        frame = np.full((64, 96, 3), 200, np.uint8)
        frame[10:30, 5 + 5 * t : 25 + 5 * t] = (0, 0, 255)
        writer.send(frame)
    writer.close()
    return path


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def test_infer_image_with_a_point(checkpoint, circle_png, tmp_path):
    out = tmp_path / "out"
    done = run_cli(
        "infer", str(circle_png), "Please segment the red circle.", "--model", str(checkpoint),
        "--point", "70,60", "--out", str(out), "--max-new-tokens", "8", tmp_path=tmp_path, progress=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "100%" in done.stderr  # the progress bar ran to the end
    assert "\033[" not in done.stdout  # no colors when stdout is not a terminal

    assert read_png(out / "overlay.png").shape == (H, W, 3)
    mask = read_png(out / "masks" / "obj001_frame000.png")
    assert mask.shape == (H, W) and set(np.unique(mask)) <= {0, 255}

    rle = json.loads((out / "masks.json").read_text())
    assert (rle["height"], rle["width"], rle["frames"]) == (H, W, [0])
    first = rle["objects"][0]
    assert (first["id"], first["source"]) == (1, "point")
    assert np.array_equal(rle_decode(first["segmentations"][0]), mask > 0)

    bank = ObjectMemoryBank.load(out / "memory.json")
    assert bank.ids[0] == 1 and bank.shape == (1, H, W) and bank.get(1).source_frame == 0
    answer = json.loads((out / "answer.json").read_text())
    assert answer["question"] == "Please segment the red circle." and answer["answer"] == done.stdout.rstrip("\n")
    assert answer["model"] == str(checkpoint) and answer["offline_model"] is False
    assert len(list((out / "masks").iterdir())) == len(bank)  # one frame per object


def test_infer_video_with_a_box_on_a_later_frame(checkpoint, clip_mp4, tmp_path, monkeypatch, capsys):
    # In process: the image test above already crosses the process boundary, this saves an interpreter start.
    monkeypatch.chdir(tmp_path)
    code = main(
        ["infer", str(clip_mp4), "What is [1] doing?", "--model", str(checkpoint), "--frames", "5",
         "--box", "10,5,40,35@2", "--max-new-tokens", "8"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    out = tmp_path / "outputs" / "clip"  # the default output folder

    overlay = load_media(out / "overlay.mp4")
    assert overlay.kind == "video" and overlay.num_frames == 5 and (overlay.height, overlay.width) == (64, 96)
    pngs = sorted(p.name for p in (out / "masks").glob("obj001_*.png"))
    assert pngs == [f"obj001_frame{t:03d}.png" for t in range(5)]
    assert all(read_png(out / "masks" / name).shape == (64, 96) for name in pngs)
    rle = json.loads((out / "masks.json").read_text())
    assert rle["frames"] == [0, 2, 4, 7, 9] and len(rle["objects"][0]["segmentations"]) == 5
    obj = ObjectMemoryBank.load(out / "memory.json").get(1)
    assert (obj.source, obj.source_frame, obj.masks.shape) == ("box", 2, (5, 64, 96))


def test_unreadable_media_exits_2_with_a_clear_message(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not an image")
    done = run_cli("infer", str(bad), "Please segment the cat.", "--model", "offline-tiny", tmp_path=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: Cannot load 'bad.png': the image data is corrupt or not a supported format (cannot identify image file 'bad.png')."
    assert done.stdout == ""


# ---- in process: checks that fail before any model is loaded ----------------------------------
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--point", "500,5"], "outside the 160x120 frame"),
        (["--box", "10,10,50,50@1"], "frame 1 is outside the 1 sampled frames"),
        (["--neg-point", "5,5"], "all negative"),
        (["--mask", "missing.png"], "cannot read the mask"),
        (["--model", "./no/such/folder"], "no checkpoint folder"),
    ],
)
def test_bad_prompt_exits_2_before_loading_a_model(circle_png, tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(tmp_path)
    assert main(["infer", str(circle_png), "Please segment it.", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


@pytest.mark.parametrize("flag", ["--point=5", "--point=1,2@x", "--box=1,2,3", "--dtype=int8"])
def test_malformed_flags_are_usage_errors(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["infer", "a.png", "q", flag])
    assert exit_info.value.code == 2 and "error: argument" in capsys.readouterr().err


def test_points_of_one_frame_are_one_object_in_flag_order(tmp_path):
    Image.fromarray(np.full((4, 5), 255, np.uint8)).save(tmp_path / "m@1.png")
    args = build_parser().parse_args(
        ["infer", "v.mp4", "q", "--box", "1,2,3,4@2", "--point", "5,6", "--mask", str(tmp_path / "m@1.png@3"),
         "--neg-point", "7,8", "--point", "9,10@1"]
    )  # fmt: skip
    objects = group_prompts(args.prompts, lambda path: np.asarray(Image.open(path)) > 0)
    assert [(o.kind, o.frame) for o in objects] == [("box", 2), ("point", 0), ("mask", 3), ("point", 1)]
    assert objects[0].box == (1, 2, 3, 4)
    assert objects[1].points == [(5, 6, True), (7, 8, False)]
    assert objects[2].mask.shape == (4, 5) and objects[2].mask.all()
    assert objects[3].points == [(9, 10, True)]


def test_answer_tags_are_colored_like_their_objects():
    bank = ObjectMemoryBank()
    bank.add(np.ones((1, 2, 2), bool), "point")
    bank.add(np.ones((1, 2, 2), bool), "answer")
    result = TurnResult("q", "See [1] and [2].", "See [1] and <|seg|>.", [Target(2, 12, 15)], [], 0.0)
    assert format_answer(result, bank, color=False) == "See [1] and [2]."
    r, g, b = bank.get(2).color
    assert format_answer(result, bank, color=True) == f"See [1] and \033[1;38;2;{r};{g};{b}m[2]\033[0m."
