#!/usr/bin/env bash
# The documentation site: `bash scripts/docs.sh [--out DIR] [--fallback]`. With Quarto on PATH it runs nbdev_docs;
# without it renders the notebooks' stored outputs with nbconvert into _docs/ (see scripts/make_docs.py).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python scripts/make_docs.py "$@"
