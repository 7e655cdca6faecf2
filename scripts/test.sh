#!/usr/bin/env bash
# The whole test suite: notebook tests, the notebook/library export check, pytest.
# `bash scripts/test.sh --slow` also runs the notebooks' `#| slow` cells.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# Every temporary file of the suite (the notebooks' scratch folders, pytest's tmp_path, torchrun's) goes into one folder
# that is removed at the end, pass or fail (failing tests' folders included: rerun pytest alone to inspect them), so a
# machine that runs the suite again and again does not fill its /tmp.
TMPDIR="$(mktemp -d "${TMPDIR:-/tmp}/fgssl_test.XXXXXX")"
export TMPDIR
trap 'rm -rf "$TMPDIR"' EXIT
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
