#!/usr/bin/env bash
# Set up (if needed) and train the quickstart: caption + VQA + grounding on ShapesWorld, CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/ofa-lightning fit --config configs/quickstart.yaml "$@"
