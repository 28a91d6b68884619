"""Record from which transformers release each coverage row applies
(``integrations/coverage_versions.json``, read by ``mmkernels.supported_models()``).

    python tools/coverage_versions.py                  # every minor release from 5.17 to the installed one
    python tools/coverage_versions.py 5.17.0 5.25.0    # these releases only (merged into the file)

For each release (the newest patch of each minor by default) it installs transformers
beside the main environment, as the lowest-transformers lane does (``pip install
--target`` of what pip resolves against ``.venv`` for that release, under
``build/transformers-<version>``), and runs :func:`mmkernels.integrations.hf.coverage_facts`
there in a subprocess: the rules whose class the release defines, the model types the
generic merge rule merges. Run it when a transformers release comes out or a rule
changes; the tests fail when the file disagrees with the installed transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOWEST = (5, 17)
PROBE = "import json; from mmkernels.integrations import hf; print('FACTS ' + json.dumps(hf.coverage_facts()))"


def _pip(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], check=True,
                          text=True, capture_output=True, **kw)  # fmt: skip


def releases() -> list[str]:
    """The newest patch of every minor release from LOWEST to the installed transformers."""
    import transformers

    out = _pip("index", "versions", "transformers").stdout
    listed = re.search(r"Available versions: (.*)", out).group(1).split(", ")
    installed = tuple(int(p) for p in transformers.__version__.split(".")[:2])
    newest: dict[tuple[int, int], tuple[int, ...]] = {}
    for v in listed:
        if not re.fullmatch(r"\d+\.\d+\.\d+", v):
            continue
        parts = tuple(int(p) for p in v.split("."))
        if LOWEST <= parts[:2] <= installed:
            newest[parts[:2]] = max(newest.get(parts[:2], parts), parts)
    return [".".join(map(str, newest[k])) for k in sorted(newest)]


def overlay(version: str) -> Path:
    """``build/transformers-<version>``: what transformers==version needs beyond .venv."""
    target = ROOT / "build" / f"transformers-{version}"
    if (target / ".complete").is_file():
        return target
    with tempfile.NamedTemporaryFile(suffix=".json") as report:
        _pip("install", "--quiet", "--no-cache-dir", "--dry-run", "--report", report.name, f"transformers=={version}")
        pins = [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in json.load(open(report.name))["install"]]
    _pip("install", "--quiet", "--no-cache-dir", "--no-deps", "--target", str(target), *pins)
    (target / ".complete").write_text(" ".join(pins) + "\n")
    return target


def facts(version: str) -> dict:
    import transformers

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRITON_INTERPRET="1")
    path = [str(ROOT)] if version == transformers.__version__ else [str(overlay(version)), str(ROOT)]
    env["PYTHONPATH"] = os.pathsep.join(path + [p for p in [env.get("PYTHONPATH")] if p])
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, text=True, capture_output=True, timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("FACTS ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"transformers {version}: the probe failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("FACTS "):])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("versions", nargs="*", help="releases to (re)check (default: every minor from 5.17)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from mmkernels.integrations import hf_versions

    data = hf_versions.load() or {"versions": [], "facts": {}}
    for version in args.versions or releases():
        print(f"[coverage_versions] transformers {version} ...", flush=True)
        data["facts"][version] = facts(version)
    data["versions"] = sorted(data["facts"], key=lambda v: tuple(int(p) for p in v.split(".")))
    hf_versions.DATA.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"[coverage_versions] wrote {hf_versions.DATA.relative_to(ROOT)} ({', '.join(data['versions'])})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
