# Sourced by the other scripts: make sure .venv exists with shardmerge and its test extras.
# TORCH_SPEC picks the torch to install when the venv has none (default: the tested pin).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  echo "creating $VENV" >&2
  python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
if ! "$PY" -c "import shardmerge, peft, transformers, pytest" 2>/dev/null \
   || [ "$ROOT/pyproject.toml" -nt "$VENV/.shardmerge-installed" ]; then
  "$PY" -m pip install -q -e "$ROOT[test]"
  # Ray has no wheel for some platforms and Pythons: its tests are skipped there.
  "$PY" -m pip install -q -e "$ROOT[test-ray]" \
    || echo "ray could not be installed here; tests/test_ray.py will be skipped" >&2
  touch "$VENV/.shardmerge-installed"
fi
