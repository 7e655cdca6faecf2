# Sourced by scripts/main.sh and scripts/test.sh: makes .venv and installs the package (editable, with
# its dev extras) when it is missing or when settings.ini / setup.py changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
"$PY" -c 'import sys; assert sys.version_info >= (3, 10), "fgssl_nb needs Python >= 3.10"' || exit 1
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $("$PY" --version)"
  "$PY" -m venv .venv
fi
stamp=$(cat settings.ini setup.py | sha256sum | cut -c1-16)
if [ "$(cat .venv/.fgssl_installed 2>/dev/null)" != "$stamp" ]; then
  echo "[setup] installing fgssl_nb and its requirements into .venv (first time: a few minutes, ~4 GB)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[dev]"
  echo "$stamp" > .venv/.fgssl_installed
fi
export PATH="$ROOT/.venv/bin:$PATH"
# 2 threads per process by default: matches small CI machines; override with OMP_NUM_THREADS.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc 2>/dev/null || echo 2)}"
