#!/usr/bin/env bash
# The main job: sets up .venv, builds tiny real-architecture VLMs, patches them with
# mmkernels, prints the patch reports, checks patched == unpatched and counts host syncs;
# on a GPU it also times the kernels. See tools/demo.py.
MMK_EXTRAS="test,bench"
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
exec python tools/demo.py "$@"
