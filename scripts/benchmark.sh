#!/usr/bin/env bash
# Set up (if needed) and run the model benchmark (real tiny preset, 2 threads, fp32 + bf16).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python benchmarks/bench_model.py --threads 2 "$@"
