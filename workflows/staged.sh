#!/usr/bin/env bash
# Staged FCN training, as in the FCN paper: FCN-32s first, then FCN-16s initialised from it,
# FCN-8s from FCN-16s, FCN-4s from FCN-8s. Each stage keeps every tensor the two variants share;
# the new skip's score layer starts at zero, so a stage starts from the previous stage's output.
#
#   workflows/staged.sh [bundle overrides ...]        (defaults: the demo's phantoms, quick config)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/phantoms/prepared}
CONFIG=${CONFIG:-"['bundle/configs/train.json','bundle/configs/quick.json']"}
EXPERIMENT=${EXPERIMENT:-staged}
ITERATIONS=${ITERATIONS:-200}

previous=None
for variant in 32s 16s 8s 4s; do
    python -m monai.bundle run training --config_file "$CONFIG" --dataset_dir "$DATA" \
        --experiment_name "$EXPERIMENT" --network_def#variant "$variant" --iterations "$ITERATIONS" \
        --init_checkpoint "$previous" --ckpt_dir "bundle/models/stage-$variant" "$@"
    previous="bundle/models/stage-$variant/model.pt"
done
liver-fcn compare --experiment "$EXPERIMENT"
