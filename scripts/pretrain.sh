#!/usr/bin/env bash
# Set up (if needed), train the ShapesWorld image tokenizer unless one exists, then run the
# eight-task pretraining (configs/pretrain/shapes.yaml) on the CPU. Extra arguments go to
# the pretraining run, e.g. --trainer.max_steps 500.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ ! -f runs/tokenizer/checkpoints/last.ckpt ]; then
    .venv/bin/ofa-lightning fit --config configs/tokenizer/shapes_vq.yaml
fi
exec .venv/bin/ofa-lightning fit --config configs/pretrain/shapes.yaml "$@"
