#!/usr/bin/env bash
# Create .venv in the repository root and install the project with its test extras.
# Idempotent: a second run only re-checks the installation.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v java >/dev/null 2>&1; then
    # pycocoevalcap's METEOR and PTB tokenizer need a Java runtime.
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq default-jre-headless >/dev/null
    else
        echo "warning: no java on PATH; METEOR and the PTB tokenizer will not run" >&2
    fi
fi
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# No torch pin: pip resolves the torch/torchvision pair that this machine can load.
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[dev]'
