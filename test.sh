#!/usr/bin/env bash
# Install the project with its test extra, then lint, type-check and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'
python3 -m ruff check sidecar tests bench
python3 -m mypy
python3 -m pytest -q "$@"
