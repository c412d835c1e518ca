#!/usr/bin/env bash
# The real-weights run on real photos (issue 13's must-show): ViT-S/14 (../shared/real) on the photo folder.
# Usage: bash benchmarks/real_photos_run.sh [RESULTS_DIR]; then lwbench plot pareto --task image_folder --results DIR
# Needs ../shared/real (the checkpoint and photos); about 35 min on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
FOLDER=$(mktemp -d)/photos
python benchmarks/real_photos.py folder "$FOLDER"
R=${1:-results-real-photos}
COMMON=(--task image_folder --data-root "$FOLDER" --backbone vit_small_patch14_dinov2
        --weights ../shared/real/vit_small_patch14_dinov2.imgfocus.safetensors --img-size 224 --results $R
        --set teacher.steps=60 --set train.steps=40)
lwbench run --method full "${COMMON[@]}"
lwbench run --method tome "${COMMON[@]}"
lwbench run --method evit "${COMMON[@]}"
lwbench run --method lookwhere --set method.distill.steps=200 "${COMMON[@]}"
lwbench run --method tome --budget r=4 "${COMMON[@]}"
lwbench run --method evit --budget keep_rate=0.5 "${COMMON[@]}"
lwbench run --method full --regime finetuned "${COMMON[@]}"
