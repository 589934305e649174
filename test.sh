#!/usr/bin/env bash
# Install the project with its test extra, then lint, type-check and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'
# The dashboard's end-to-end tests drive Debian's chromium; install it where we can (they skip, saying so, if not).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    sudo=""
    if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then sudo="sudo -n"; fi
    if [ "$(id -u)" = 0 ] || [ -n "$sudo" ]; then
        { $sudo apt-get install -y -qq chromium || { $sudo apt-get update -qq && $sudo apt-get install -y -qq chromium; }; } \
            >/dev/null 2>&1 || echo "test.sh: could not install chromium; the dashboard tests will skip" >&2
    fi
fi
python3 -m ruff check sidecar tests bench tools
python3 -m mypy
# Two processes, each test file whole in one of them (its module fixtures and servers are started once).
# -p no:benchmark: pytest-benchmark, where installed, refuses to run beside xdist.
python3 -m pytest -q -n 2 --dist loadfile -p no:benchmark "$@"
