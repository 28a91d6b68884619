#!/usr/bin/env bash
# The test command: sets up .venv, compiles every kernel ahead of time for sm_80 and
# sm_90 (the kernel report with --check: fails on spills and on GEMMs without tensor
# cores), then runs the whole suite with the kernels in Triton's interpreter on CPU.
# Extra arguments go to pytest (and skip the kernel report), e.g. `bash tools/test.sh -k merge`.
MMK_EXTRAS="test"
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
set +e
status=0
if [ $# -eq 0 ]; then
  env -u TRITON_INTERPRET python tools/kernel_report.py --check --markdown build/kernel_report.md >/dev/null || status=1
  [ $status -eq 0 ] && echo "[mmkernels] kernel report --check passed (table: build/kernel_report.md)"
fi
export TRITON_INTERPRET=1 HF_HUB_OFFLINE=1
python -m pytest -n "${MMK_TEST_WORKERS:-auto}" -q "$@" || status=1
exit $status
