#!/usr/bin/env bash
# Generate a small model and LoRA adapter, merge them with shardmerge, check the result.
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
exec "$PY" "$ROOT/scripts/demo.py" "$@"
