#!/usr/bin/env bash
# The test command: sets up .venv, runs the whole suite (kernels under Triton's
# interpreter on CPU) and the ahead-of-time kernel report with --check.
# Extra arguments go to pytest, e.g. `bash tools/test.sh -k merge`.
MMK_EXTRAS="test"
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
set +e
export TRITON_INTERPRET=1 HF_HUB_OFFLINE=1
workers="${MMK_TEST_WORKERS:-auto}"
python -m pytest -n "$workers" -q "$@"
status=$?
if [ $# -eq 0 ]; then
  # The kernels compiled for sm_80 and sm_90: fails on spills and on GEMMs without tensor cores.
  env -u TRITON_INTERPRET python tools/kernel_report.py --check --markdown build/kernel_report.md || status=1
fi
exit $status
