#!/usr/bin/env bash
# Train the shipped offline model (assets/unipixel-shapes, stage 37) from scratch into WORK/shipped.
#
#     bash unipixel/train/reproduce.sh WORK
#
# Only the stages whose weights reach the shipped model, in the order they ran (their numbers are the
# model card's stage table; unipixel/train/NOTES.md says why each exists). Time as run: about 12.6
# hours on the 2-core CPU plus 34 minutes on one GPU (stages 11, 17, 18, 22-23: their --workers and
# --max-minutes are for a GPU, which the scripts pick up by themselves; on the CPU they stop at the
# same minutes having trained less). Most stages end on a time budget, so another machine reaches
# other step counts: the result is a model of the same recipe, not the same bytes.
set -euo pipefail
mkdir -p "$1" && cd "$1"
train() { python -m unipixel.train.trainer "$@"; }
sam() { python -m unipixel.train.sam_stage "$@"; }
vision() { python -m unipixel.train.vision_stage "$@"; }
last() { ls -d "$1"/checkpoint-* | sort -t- -k2 -n | tail -1; }
ship() {  # ship CHECKPOINT OUT [VISION_FROM]: float16 export, optionally with another run's vision side
  python -c "import sys; from unipixel.train.checkpoints import export; export(*sys.argv[1:3], vision_from=(sys.argv[3:] or [None])[0])" "$@"
}
color_prompts() {  # color_prompts MODEL OUT: each color's mean seg prompt, the target SAM 2 learns to answer
  python - "$@" <<'EOF'
import sys, torch
from unipixel import load_model
from unipixel.train.fits import seg_states
from unipixel.train.sam_prompts import save_color_prompts
model, processor = load_model(sys.argv[1], device="cpu", dtype=torch.float32)
with torch.no_grad():
    states, colors = seg_states(model, processor, num=320)
    tokens = model.seg_head(states).view(len(states), 2, -1)
save_color_prompts(torch.stack([tokens[colors == k].mean(0) for k in range(8)]), sys.argv[2])
EOF
}
fitted() {  # fitted OUT FROM SEED: the shape words' LM head rows fitted to the states before them
  train "$1" --init-from "$2" --fit-shape-head --seed "$3" --steps 0 $TALK
  train "$1" --export "$1-ship"
}
language() {  # language OUT FROM SEED LR MINUTES: a CPU language stage on a held vision side and SAM 2
  train "$1" $CPU $LANG --init-from "$2" --seed "$3" --lr "$4" --max-minutes "$5"
  train "$1" --export "$1-ship"
}
# new_images N VISION LANGUAGE FIRST_BATCH MINUTES SEED: VISION's tower trained on images no earlier run
# drew, put into LANGUAGE's model, the shape rows fitted (sNf-ship)
new_images() {
  ship "$(last "$2")" "$2-ship"
  vision "$2-ship" "s$1v" --steps 100000 --batch-size 32 --loaders 1 --lr 4e-4 --warmup 10 --keep 1 --repeat 2 \
    --first-batch "$4" --max-minutes "$5"
  ship "$3" "s$1l0" "$(last "s$1v")"
  fitted "s$1f" "s$1l0" "$6"
}
CPU="--workers 2 --batch-size 8"
TALK="--video-prob 0.2 --qa-prob 0.5 --frames 8 8 12 16 --turns 3 7 --save-every 20"
HOLD="--prompted 0 --distill 5 --hold sam2=100000"
LOOKUP="$HOLD model.visual=100000 msk_proj=100000 --attend-mem 1 --attend-head 0 3"
POINTS="--hold-encoder --video-prob 0.3 --frames 4 8 --steps 1000 --batch-size 8 --warmup 10"
FOLLOW="$CPU --distill 5 --keep-segs 2 --mem-own 1.0 --steps 3000 --lr 2e-4 --warmup 5 $TALK --train-only \
  model.language_model.layers.1 model.language_model.layers.2 model.language_model.layers.3 model.language_model.norm \
  lm_head msk_proj"

# 0-4 (CPU, 152 min): everything from scratch, batch of one; then the language side again, batched
train s0 --steps 4600 --batch-size 1 --qa-prob 0.5 --max-minutes 60
train s1 $CPU --init-from "$(last s0)" --reset-llm --steps 1650 --lr 1e-3 --warmup 50 --video-prob 0.25 \
  --frames 8 8 12 16 --turns 2 5 --max-minutes 22
train s2 $CPU --init-from "$(last s1)" --steps 1200 --lr 7e-4 --warmup 20 --video-prob 0.25 --frames 8 8 12 16 \
  --turns 3 7 --max-minutes 17
train s3 $CPU --init-from "$(last s2)" --steps 850 --lr 6e-4 --warmup 10 --video-prob 0.2 --qa-prob 0.35 \
  --frames 8 8 12 16 --turns 3 7 --max-minutes 19
train s4 $CPU --init-from "$(last s3)" --untie-embeddings --steps 900 --lr 6e-4 --warmup 10 --video-prob 0.2 \
  --qa-prob 0.35 --frames 8 8 12 16 --turns 3 7 --max-minutes 42
# 5-10 (CPU, 129 min): SAM 2 learns color prompts, the seg head is fitted onto them, SAM 2 learns to track
sam "$(last s4)" s5 --fresh-decoder --steps 1500 --max-minutes 25
train s6 $CPU --init-from "$(last s5)" --fit-seg-head --color-prompts s5/color_tokens.pt $HOLD --steps 700 \
  --lr 6e-4 --warmup 20 --video-prob 0.0 --qa-prob 0.2 --turns 3 7
sam "$(last s6)" s8 --color-prompts s5/color_tokens.pt --video-prob 0.5 --frames 8 --steps 500 --batch-size 8 \
  --lr 3e-4 --max-minutes 20
train s9 $CPU --init-from "$(last s8)" --color-prompts s5/color_tokens.pt $HOLD --steps 450 --lr 4e-4 --warmup 10 \
  --video-prob 0.3 --qa-prob 0.2 --frames 8 8 12 16 --turns 3 7 --save-every 50 --max-minutes 26
sam "$(last s9)" s10 --color-prompts s5/color_tokens.pt --video-prob 0.6 --frames 8 8 12 16 --steps 420 \
  --batch-size 8 --lr 3e-4 --max-minutes 24
ship "$(last s10)" s10-ship
# 11 (GPU, 7.3 min): the language stage with 12 processes
train s11 --workers 12 --batch-size 8 --init-from s10-ship --color-prompts s5/color_tokens.pt $HOLD --steps 5000 \
  --lr 5e-4 --warmup 10 --video-prob 0.3 --qa-prob 0.2 --frames 8 8 12 16 --turns 3 7 --save-every 50 --max-minutes 7.3
train s11 --export s11-ship --sam-from s10-ship
# 14-16 (CPU, 82 min): SAM 2 alone learns to track, then point and box prompts through the point channel
sam s11-ship s14 --color-prompts s5/color_tokens.pt --kind-probs 1 0 0 --feature-scale 0.03 --video-prob 0.6 \
  --frames 4 8 8 --steps 900 --batch-size 8 --lr 3e-4 --warmup 10 --max-minutes 40
sam "$(last s14)" s15 --color-prompts s5/color_tokens.pt --kind-probs 1 0 0 --video-prob 0.7 --frames 4 8 8 12 \
  --steps 400 --batch-size 8 --lr 2e-4 --warmup 5 --max-minutes 18
ship "$(last s15)" s15-ship
sam s15-ship s16 --color-prompts s5/color_tokens.pt --kind-probs 0.25 0.5 0.25 --point-channel --video-prob 0.2 \
  --frames 4 8 --steps 1600 --batch-size 8 --lr 1e-3 --warmup 10 --max-minutes 24
ship "$(last s16)" s16-ship
# 17-18 (GPU, 16 min; 1 min CPU): shape features in the vision tower, then the language model names shapes
vision s16-ship s17v --steps 20000 --batch-size 64 --loaders 14 --lr 1e-3 --warmup 50 --keep 1 --max-minutes 5.5
vision "$(last s17v)" s17v2 --steps 20000 --batch-size 64 --loaders 14 --lr 8e-4 --warmup 20 --keep 1 --max-minutes 3.0
train s17 --workers 12 --batch-size 8 --init-from "$(last s17v)" --color-prompts s5/color_tokens.pt $HOLD $TALK \
  --steps 3000 --lr 4e-4 --warmup 5 --max-minutes 2.0
train s17 --export s17-ship --vision-from "$(last s17v2)"
color_prompts s17-ship s18-color_tokens.pt
vision s17-ship s18s --steps 0 --sharpen-shapes 6
S18="--workers 12 --batch-size 8 --color-prompts s18-color_tokens.pt $LOOKUP $TALK --steps 3000 --warmup 5"
train s18a $S18 --init-from "$(last s18s)" --redraw-shape-head --lr 5e-4 --max-minutes 1.3
train s18b $S18 --init-from "$(last s18a)" --fit-shape-head --seed 1 --lr 4e-4 --max-minutes 4.3
train s18b --export s18b-ship
train s18c --init-from s18b-ship --fit-shape-head lowercase --seed 3 --steps 0 $TALK
train s18c --export s18-ship
# 21 (CPU, 31 min): SAM 2 on points and boxes, toward color prompts from stage 18's own seg prompts
color_prompts s18-ship s21-color_tokens.pt
sam s18-ship s21s --color-prompts s21-color_tokens.pt --kind-probs 0.25 0.45 0.3 --hold-encoder --video-prob 0.3 \
  --frames 4 8 --steps 1100 --batch-size 8 --lr 5e-4 --warmup 10 --max-minutes 30
ship "$(last s21s)" s21s-ship
# 22-23 (GPU, 10 min; 1.5 min CPU): the vision tower again, a language stage on it, the vision tower again
LANG="--color-prompts s21-color_tokens.pt $LOOKUP $TALK --steps 3000 --warmup 5"
vision s21s-ship s22v --steps 100000 --batch-size 64 --loaders 14 --lr 8e-4 --warmup 20 --keep 1 --repeat 3 \
  --max-minutes 4.3
train s22l --workers 12 --batch-size 8 $LANG --init-from "$(last s22v)" --fit-shape-head --seed 1 --lr 4e-4 \
  --max-minutes 2.7
train s22l --export s22l-ship
ship "$(last s22v)" s22v-ship
vision s22v-ship s23v --steps 100000 --batch-size 64 --loaders 14 --lr 6e-4 --warmup 10 --keep 1 --repeat 3 \
  --max-minutes 3.1
ship s22l-ship s23l "$(last s23v)"
fitted s23f s23l 3
# 24-28 (CPU, 3.4 h): language stages on the vision side, the vision tower twice more on new images
language s24l s23f-ship 4 3e-4 30
language s25l s24l-ship 5 2e-4 21
new_images 26 s23v s25l-ship 600 34 6
language s26l s26f-ship 6 2.5e-4 38
language s27l s26l-ship 8 1.5e-4 13
new_images 28 s26v s27l-ship 1000 40 9
language s28l s28f-ship 9 2.5e-4 30
# 29-31 (CPU, 67 min): SAM 2 on points and boxes on new scenes, then the PixelQA route built by hand
sam s28l-ship s29s --color-prompts s21-color_tokens.pt $POINTS --kind-probs 0.25 0.45 0.3 --lr 3e-4 --max-minutes 28 \
  --first-step 5000
sam "$(last s29s)" s30s --color-prompts s21-color_tokens.pt $POINTS --kind-probs 0.2 0.4 0.4 --lr 2e-4 --max-minutes 16 \
  --first-step 6000
sam "$(last s30s)" s31s --color-prompts s21-color_tokens.pt $POINTS --kind-probs 0.2 0.4 0.4 --lr 2e-4 --max-minutes 20 \
  --first-step 7000
train s31 --init-from "$(last s31s)" --route-ref-place 3 --calibrate-place --steps 0
train s31 --export s31-ship
# 34 (CPU, 30 min): language layers 1-3 on follow-ups over the model's own tracks, seg prompts kept
train s34 $FOLLOW --init-from s31-ship --seed 12 --max-minutes 30
train s34 --export s34-ship
# 36 (CPU, 30 min): SAM 2's input raised from 192 to 256 px, its mask decoder trained there
cp -r s34-ship s34-256 && sed -i 's/"sam2_image_size": 192/"sam2_image_size": 256/' s34-256/config.json
train s36 $CPU --init-from s34-256 --seed 16 --train-only sam2.sam_mask_decoder --pixelqa-prob 0.7 --qa-prob 0 \
  --video-prob 0.3 --frames 4 8 --turns 1 3 --steps 1500 --lr 3e-4 --warmup 20 --save-every 150 --max-minutes 30
train s36 --export s36-ship
# 37 (CPU, 27 min): stage 34's recipe on the 256 px tracks
train s37 $FOLLOW --init-from s36-ship --seed 18 --max-minutes 27
train s37 --export shipped
