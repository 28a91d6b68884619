#!/usr/bin/env bash
# Second CI lane: the model-level tests (zoo and patch specs) on the lowest transformers
# mmkernels supports (5.17, what the GPU machines carry). It runs in the main .venv with
# an overlay in front of site-packages: only the distributions that transformers 5.17
# needs in other versions than .venv has (pip resolves against .venv: transformers and
# huggingface_hub, ~120 MB), instead of a second 6 GB venv with its own torch.
MMK_EXTRAS="test"
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
set +e
LOWEST="transformers==5.17.0"
overlay="$venv/overlay-${LOWEST/==/-}"
# Redone when .venv was (re)installed ($want: _venv.sh's stamp), since it resolves against it.
if [ ! -f "$overlay/.complete" ] || [ "$(cat "$overlay/.complete")" != "$want" ]; then
  rm -rf "$overlay"
  report="$(mktemp)"
  python -m pip install --quiet --disable-pip-version-check --no-cache-dir --dry-run \
    --report "$report" "$LOWEST" || exit 1
  mapfile -t pins < <(python -c '
import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
    print(item["metadata"]["name"] + "==" + item["metadata"]["version"])' "$report")
  rm -f "$report"
  echo "[mmkernels] overlay for $LOWEST: ${pins[*]}"
  python -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-deps \
    --target "$overlay" "${pins[@]}" || exit 1
  echo "$want" > "$overlay/.complete"
fi
export PYTHONPATH="$overlay${PYTHONPATH:+:$PYTHONPATH}"
got="$(python -c 'import transformers; print(transformers.__version__)')"
if [ "$got" != "${LOWEST#*==}" ]; then
  echo "[mmkernels] the overlay gives transformers $got, not ${LOWEST#*==}" >&2
  exit 1
fi
export TRITON_INTERPRET=1 HF_HUB_OFFLINE=1
python -m pytest -n "${MMK_TEST_WORKERS:-auto}" -q tests/test_zoo.py tests/test_patch_hf.py tests/test_merge.py \
  tests/test_patch_embed_hf.py tests/test_patch_conv_hf.py tests/test_attention_hf.py tests/test_attention_mllama.py \
  tests/test_attention_idefics.py tests/test_attention_vision_towers.py tests/test_quantize_projector.py \
  tests/test_generic_merge.py tests/test_perception_lm_hf.py tests/test_paddleocr_vl_hf.py tests/test_gemma3n_hf.py \
  tests/test_granite_speech_hf.py tests/test_gemma4_hf.py tests/test_ovis2_hf.py tests/test_llava_next_video_hf.py \
  tests/test_coverage_versions.py "$@"
