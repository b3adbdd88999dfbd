#!/usr/bin/env bash
# FCN-8s against FCN-4s: train both with the same recipe, evaluate both on the test split,
# and compare them in MLflow (table, CSV, Markdown and validation curves).
#
#   workflows/compare_variants.sh [bundle overrides ...]
#
# Defaults: the demo's phantoms and the CPU-sized quick config. For 3D-IRCADb-01 with the paper's
# recipe, see workflows/ircadb_paper.sh, which calls this script with
#   DATA=data/ircadb CONFIG="['bundle/configs/train.json']".
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/phantoms/prepared}
CONFIG=${CONFIG:-"['bundle/configs/train.json','bundle/configs/quick.json']"}
EXPERIMENT=${EXPERIMENT:-fcn8s-vs-fcn4s}
VARIANTS=${VARIANTS:-"8s 4s"}

if [ ! -f "$DATA/datalist.json" ]; then
    echo "no $DATA/datalist.json: run make demo (phantoms) or liver-fcn prepare first" >&2
    exit 2
fi
EVAL_CONFIG="${CONFIG%]},'bundle/configs/evaluate.json']"

for variant in $VARIANTS; do
    python -m monai.bundle run training --config_file "$CONFIG" --dataset_dir "$DATA" \
        --experiment_name "$EXPERIMENT" --network_def#variant "$variant" \
        --ckpt_dir "bundle/models/fcn$variant" "$@"
    python -m monai.bundle run evaluating --config_file "$EVAL_CONFIG" --dataset_dir "$DATA" \
        --ckpt_dir "bundle/models/fcn$variant"
done
liver-fcn compare --experiment "$EXPERIMENT"
