#!/usr/bin/env bash
# The main job on the built-in default data. Extra arguments go to fgssl_demo (see `fgssl_demo --help`).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
fgssl_demo --data default --out runs/demo "$@"
