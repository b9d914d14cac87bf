"""Bytes one media's cached features take (what `--cache-gb` budgets), for UniPixel-3B at 768 px.

Vision tokens follow from the processor's grid; SAM 2.1 Hiera-B+ frame features are measured on
one random-weight frame (float32 on the CPU; bfloat16 on a GPU halves the feature maps, not the
positional encodings SAM 2 keeps in float32) and scaled to the frame count.

    .venv/bin/python bench/cache_sizes.py [--frames 16] [--size 1280x720]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from unipixel.calls import nbytes  # noqa: E402
from unipixel.model.processing import max_pixels, smart_resize  # noqa: E402
from unipixel.model.sam2_video import build_sam2  # noqa: E402

MIB = 2**20


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", default="1280x720", help="source frame WxH")
    args = parser.parse_args(argv)
    w, h = (int(v) for v in args.size.split("x"))
    t = args.frames

    rh, rw = smart_resize(h, w, factor=28, min_pixels=128 * 28 * 28, max_pixels=max_pixels(t))
    tokens = (t + t % 2) // 2 * (rh // 28) * (rw // 28)
    vision = tokens * (2048 + 5120) * 2  # bfloat16 merged tokens [N, 2048] + merger inputs [N, 5120]

    sam2 = build_sam2("configs/sam2.1_hiera_b+", 768).eval()
    image = torch.zeros(1, 3, 768, 768)
    with torch.inference_mode():
        per_frame = nbytes(sam2.forward_image(image)) + image.nbytes
    print(f"UniPixel-3B, {t} frames of {w}x{h} (LLM frames {rw}x{rh}, {tokens} vision tokens):")
    print(f"  vision tokens        {vision / MIB:8.1f} MiB (bfloat16)")
    print(f"  SAM 2 frames+features {t * per_frame / MIB:7.1f} MiB ({per_frame / MIB:.1f} MiB a frame, float32)")
    print(f"  total                {(vision + t * per_frame) / MIB:8.1f} MiB")


if __name__ == "__main__":
    main()
