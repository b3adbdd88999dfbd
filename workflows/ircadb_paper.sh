#!/usr/bin/env bash
# 3D-IRCADb-01 reproduction of the paper: prepare the database, train FCN-8s and FCN-4s from
# ImageNet VGG16 with train.json's recipe (Adam 3e-4, betas 0.9/0.99, batch 32, 0.8 mm pixels:
# 512 x 512 around the body, augmentation, cross-entropy + Dice, 20000 iterations with warm-up and
# cosine decay), evaluate both on the test patients, compare them in MLflow.
#
#   workflows/ircadb_paper.sh /path/to/3Dircadb1 [bundle overrides, e.g. --iterations 10000]
#
# Needs the ImageNet VGG16 weights vgg16-397923af.pth in $TORCH_HOME/hub/checkpoints (or set
# PRETRAINED=/path/to/file, or PRETRAINED=None to train from scratch), and a GPU: on a CPU the
# full-width network at 512 x 512 takes seconds per slice (make bench); use cpu.json there.
set -euo pipefail
cd "$(dirname "$0")/.."
IRCADB=${1:?usage: workflows/ircadb_paper.sh /path/to/3Dircadb1 [bundle overrides]}
shift
DATA=${DATA:-data/ircadb}
PRETRAINED=${PRETRAINED:-True}

[ -f "$DATA/datalist.json" ] || liver-fcn prepare --ircadb "$IRCADB" --out "$DATA"

DATA="$DATA" CONFIG="['bundle/configs/train.json']" EXPERIMENT=${EXPERIMENT:-ircadb-paper} \
    workflows/compare_variants.sh --network_def#pretrained "$PRETRAINED" "$@"
