#!/usr/bin/env bash
# The latent recipe end to end on the built-in digits, on a CPU (~10 minutes on 2 cores):
#   1. train a VAE from scratch         1 x 16 x 16 digits -> 4 x 8 x 8 latents
#   2. encode the train split once      a latent store with labels
#   3. train a class-conditional DiT    patch 2 on the latents, label dropout for guidance
#   4. sample with guidance             a grid, and 1000 samples to a folder (decoded by the VAE)
#   5. evaluate                         class accuracy and FID (digit-classifier features) of the
#                                       1000 samples against the train split
#
#   bash scripts/digits_latent_recipe.sh
#
# Everything goes under $RUNS (default runs/); re-running resumes or skips what is done. For a
# quick smoke run: VAE_STEPS=20 DIT_STEPS=20 N_EVAL=50 bash scripts/digits_latent_recipe.sh
set -euo pipefail

RUNS=${RUNS:-runs}
VAE_STEPS=${VAE_STEPS:-1200}
DIT_STEPS=${DIT_STEPS:-3000}
N_EVAL=${N_EVAL:-1000}
CFG=${CFG:-2.0}
PROGRESS=${PROGRESS:-}   # set PROGRESS=--no-progress for logs without bars

flowmatch train-vae configs/digits_vae.yaml out_dir="$RUNS/digits_vae" steps="$VAE_STEPS" $PROGRESS
flowmatch encode-latents --vae "$RUNS/digits_vae/vae" --dataset digits --split train --image-size 16 \
    --out "$RUNS/digits_latents" --dtype float32 $PROGRESS
flowmatch train configs/digits_latent_dit.yaml data.path="$RUNS/digits_latents" \
    out_dir="$RUNS/digits_latent_dit" train.steps="$DIT_STEPS" $PROGRESS
flowmatch sample "$RUNS/digits_latent_dit" -n 100 --cfg-scale "$CFG" \
    --out "$RUNS/digits_latent_dit/samples_cfg.png" $PROGRESS
flowmatch sample "$RUNS/digits_latent_dit" -n "$N_EVAL" --cfg-scale "$CFG" \
    --out "$RUNS/digits_latent_dit/eval_cfg" $PROGRESS
# the digit classifier (features for FID, and the accuracy check) is trained once, here, if missing
flowmatch eval accuracy --samples "$RUNS/digits_latent_dit/eval_cfg" --classifier "$RUNS/digit_classifier.pt"
flowmatch eval fid --samples "$RUNS/digits_latent_dit/eval_cfg" --ref digits:train --extractor digits \
    --classifier "$RUNS/digit_classifier.pt" --image-size 16 $PROGRESS
echo "grid: $RUNS/digits_latent_dit/samples_cfg.png (one column per class 0-9, guidance scale $CFG)"
