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
