#!/usr/bin/env bash
# Run the test suite; creates .venv and installs everything it needs first.
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
cd "$ROOT"
"$PY" -m ruff check shardmerge tests scripts
"$PY" -m ruff format --check shardmerge tests scripts
exec "$PY" -m pytest "$@"
