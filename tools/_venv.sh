# Sourced by tools/test.sh and tools/demo.sh: create or reuse .venv and install mmkernels
# with the extras named in $MMK_EXTRAS. Reinstalls only when pyproject.toml changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MMK_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[mmkernels] creating virtual environment $venv"
  "$python" -m venv "$venv"
fi
stamp="$venv/.mmkernels-installed"
want="$(cat "$root/pyproject.toml" | sha256sum | cut -c1-16) ${MMK_EXTRAS}"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[mmkernels] installing mmkernels[${MMK_EXTRAS}] into $venv (first run takes a minute or two)"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$root[${MMK_EXTRAS}]"
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
cd "$root"
