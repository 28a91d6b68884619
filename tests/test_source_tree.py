"""mmkernels runs from a source tree, not installed (``PYTHONPATH=<repo>``), as on the GPU
machines: ``mmkernels.integrations`` (mapped from the top-level ``integrations/`` only by
an install) must still import there."""

import os
import site
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_integrations_import_from_a_source_tree_without_install(tmp_path):
    # `-S` skips site-packages' .pth files, so the editable install's finder is not loaded;
    # site-packages themselves stay reachable through PYTHONPATH (torch, transformers).
    paths = [str(REPO), *site.getsitepackages()]
    code = (
        "import sys, mmkernels\n"
        "from mmkernels import integrations\n"
        "from mmkernels.integrations import engine\n"
        "assert not any('__editable__' in type(f).__module__ for f in sys.meta_path), sys.meta_path\n"
        "print(integrations.__file__, engine.__file__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join(paths)
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    integrations_file, engine_file = out.stdout.split()
    assert Path(integrations_file) == REPO / "integrations" / "__init__.py"
    assert Path(engine_file) == REPO / "integrations" / "engine.py"


def test_no_private_name_is_imported_across_modules():
    """What two modules share is public in one of them (issue 18): an import of a private
    name from another of this project's modules is a helper that belongs in
    ``integrations/engine.py``, the op, or ``mmkernels.quant``. An op's own ``_*_kernels``
    module (its Triton bodies) is the one private module its op imports."""
    import ast

    found = []
    for folder in ("mmkernels", "integrations"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.ImportFrom) or node.module == "__future__":
                    continue
                ours = node.level > 0 or (node.module or "").split(".")[0] in ("mmkernels", "integrations")
                if not ours:
                    continue  # a library's private API is used where it must be, and named there
                for alias in node.names:
                    private = alias.name.startswith("_") and not alias.name.startswith("__")
                    if private and not alias.name.endswith("_kernels"):
                        found.append(f"{path.relative_to(REPO)}:{node.lineno}: from {'.' * node.level}"
                                     f"{node.module or ''} import {alias.name}")  # fmt: skip
    assert not found, "\n".join(found)


def test_the_vllm_side_never_loads_the_hugging_face_side():
    """``mmkernels.integrations.vllm`` (what a vLLM process imports through the entry
    point) loads no module of the Hugging Face side and no transformers code; the Hugging
    Face names of ``mmkernels.integrations`` still load on first use (issue 21)."""
    code = (
        "import json, sys\n"
        "before = set(sys.modules)\n"
        "import mmkernels.integrations.vllm, mmkernels.integrations.vllm.plugin\n"
        "loaded = sorted(set(sys.modules) - before)\n"
        "from mmkernels.integrations import patch, PatchReport\n"
        "after = sorted(set(sys.modules) - before)\n"
        "print(json.dumps([loaded, after]))\n"
    )
    env = {k: v for k, v in os.environ.items()}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    loaded, after = json.loads(out.stdout.strip().splitlines()[-1])
    ours = [m for m in loaded if m.startswith("mmkernels.integrations.") and not m.startswith("mmkernels.integrations.vllm")]
    assert not ours, ours
    assert not [m for m in loaded if m == "transformers" or m.startswith("transformers.")]
    assert "mmkernels.integrations.hf" in after and "mmkernels.integrations.engine" in after
