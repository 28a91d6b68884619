#!/usr/bin/env bash
# Second CI lane: the model-level tests (zoo and patch specs) on the lowest transformers
# mmkernels supports (5.17, what the GPU machines carry), in its own .venv-lowest.
MMK_EXTRAS="test"
MMK_VENV="${MMK_VENV:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv-lowest}"
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
set +e
if [ "$(python -c 'import transformers; print(transformers.__version__)')" != "5.17.0" ]; then
  python -m pip install --quiet --disable-pip-version-check "transformers==5.17.0" || exit 1
fi
export TRITON_INTERPRET=1 HF_HUB_OFFLINE=1
python -m pytest -n "${MMK_TEST_WORKERS:-auto}" -q tests/test_zoo.py tests/test_patch_hf.py tests/test_merge.py \
  tests/test_patch_embed_hf.py tests/test_patch_conv_hf.py tests/test_attention_hf.py tests/test_attention_mllama.py \
  tests/test_attention_idefics.py tests/test_quantize_projector.py "$@"
