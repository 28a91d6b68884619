#!/usr/bin/env bash
# Run transformers' OWN model tests with every model they build patched by mmkernels.
#
#   TRANSFORMERS_TESTS_ROOT=/path/to/transformers tools/run_hf_model_tests.sh [pytest args]
#
# TRANSFORMERS_TESTS_ROOT: a transformers source tree (its root conftest.py, tests/ and
# utils/), ideally at the tag of the installed version (v$(python -c 'import
# transformers; print(transformers.__version__)')). Nothing in it is changed.
# With no pytest args: llava, qwen2_vl, gemma3 and mllama's modeling tests.
# Uses the active Python (or .venv's); test extras transformers' tests import:
# parameterized, requests, httpx.
#
# Environment (read by tools/hf_tests_patched/mmkernels_patched.py):
#   MMKERNELS_HF_PATCH=1|0          patch every model (default 1); 0 = the plain baseline
#   MMKERNELS_HF_ATTENTION=0|default|sdpa
#                                   route transformers' default (or also explicit sdpa)
#                                   attention through the "mmkernels" implementation
#   MMKERNELS_HF_KERNELS=a,b        patch(kernels=...) (default: all)
#
# The interpreter is slow: select with -k, e.g.
#   MMKERNELS_HF_ATTENTION=default tools/run_hf_model_tests.sh \
#     tests/models/llava/test_modeling_llava.py -k static_cache
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
: "${TRANSFORMERS_TESTS_ROOT:?set TRANSFORMERS_TESTS_ROOT to a transformers source tree (with tests/)}"
if [ ! -d "$TRANSFORMERS_TESTS_ROOT/tests/models" ]; then
  echo "TRANSFORMERS_TESTS_ROOT=$TRANSFORMERS_TESTS_ROOT has no tests/models" >&2
  exit 2
fi
python="python"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$root/.venv/bin/python" ]; then
  python="$root/.venv/bin/python"
fi
export TRITON_INTERPRET="${TRITON_INTERPRET:-1}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$here/hf_tests_patched:$root${PYTHONPATH:+:$PYTHONPATH}"
cd "$TRANSFORMERS_TESTS_ROOT"
if [ "$#" -eq 0 ]; then
  set -- tests/models/llava/test_modeling_llava.py tests/models/qwen2_vl/test_modeling_qwen2_vl.py \
    tests/models/gemma3/test_modeling_gemma3.py tests/models/mllama/test_modeling_mllama.py
fi
exec "$python" -m pytest -p mmkernels_patched -p no:cacheprovider "$@"
