#!/usr/bin/env bash
# Set up (or update) the project's virtualenv at .venv. Safe to run again: it only installs
# what is missing. torch/torchvision are pinned to the builds that lie on this kind of machine's
# disk; everything else comes from PyPI through pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e '.[dev]'
