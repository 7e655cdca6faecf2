#!/usr/bin/env bash
# The whole test suite: notebook tests, the notebook/library export check, pytest.
# `bash scripts/test.sh --slow` also runs the notebooks' `#| slow` cells.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
flags=()
[ "${1:-}" = "--slow" ] && flags=(--flags slow)

echo "== export check: nbdev_export must leave fgssl_nb/ unchanged"
snap=$(mktemp -d)
cp -r fgssl_nb "$snap/"
nbdev_export
if ! diff -r -x __pycache__ "$snap/fgssl_nb" fgssl_nb; then
  echo "FAIL: fgssl_nb/ differs from what the notebooks export. Edit nbs/, run nbdev_export, commit both."
  rm -rf "$snap"; exit 1
fi
rm -rf "$snap"
python scripts/make_readme.py --check

echo "== nbdev_test (notebook test cells)"
nbdev_test --n_workers 1 "${flags[@]}"

echo "== pytest tests/"
python -m pytest tests/ -q -p no:cacheprovider
