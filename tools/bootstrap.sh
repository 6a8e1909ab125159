#!/usr/bin/env bash
# Create .venv with Python 3.12 and install the pinned requirements plus this package.
# Usage: bash tools/bootstrap.sh        (idempotent; re-run after changing requirements.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

find_python312() {
  local cand
  for cand in python3.12 python3 python; do
    if command -v "$cand" >/dev/null 2>&1 &&
       "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      command -v "$cand"; return 0
    fi
  done
  local root="${PYENV_ROOT:-$HOME/.pyenv}"
  command -v pyenv >/dev/null 2>&1 && root="$(pyenv root)"
  for cand in $(ls -d "$root"/versions/3.12*/bin/python3.12 2>/dev/null | sort -V -r); do
    [ -x "$cand" ] && { echo "$cand"; return 0; }
  done
  return 1
}

if [ ! -x "$VENV/bin/python" ] ||
   ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  PY=$(find_python312) || { echo "error: no Python 3.12 found on PATH or under pyenv" >&2; exit 1; }
  echo "creating $VENV with $PY"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
fi

stamp="$VENV/.requirements.sha"
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements.txt
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e .
  echo "$want" > "$stamp"
fi
echo "environment ready: $VENV ($("$VENV/bin/python" --version))"
