#!/usr/bin/env bash
# Phantom demo: synthetic patients in the 3D-IRCADb-01 layout -> liver-fcn prepare ->
# FCN-8s training on the CPU (the quick config) -> validation IoU / Dice in MLflow.
# Run from anywhere; uses the `liver-fcn` and `python` of the current environment.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/phantoms}

if [ ! -f "$DATA/prepared/datalist.json" ]; then
    rm -rf "$DATA"
    liver-fcn phantom --out "$DATA/raw" --patients 6 --seed 0
    liver-fcn prepare --ircadb "$DATA/raw" --out "$DATA/prepared"
else
    echo "reusing the phantoms in $DATA (delete it to write new ones)"
fi

python -m monai.bundle run training \
    --config_file "['bundle/configs/train.json','bundle/configs/quick.json']" \
    --dataset_dir "$DATA/prepared" "$@"

# a picture of the best checkpoint's prediction on the validation patient (the training run already
# holds the same picture in MLflow, under plots/)
python workflows/overlay.py --config "['bundle/configs/train.json','bundle/configs/quick.json']" \
    --dataset_dir "$DATA/prepared" --out bundle/eval/overlay.png --tracking_uri none
