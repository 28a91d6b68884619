"""The vLLM lane (tools/test_vllm.sh): real vLLM processes on CPU serving tiny zoo models.

Kept out of the main lane (pyproject's testpaths are ``tests`` and ``benchmarks``; the
main environment has no vLLM). Every vLLM instance runs in a subprocess: vLLM spawns its
workers, and each plugin state (on / off) needs fresh processes.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

try:  # a lane without vLLM must fail, not skip everything and pass
    import vllm  # noqa: F401
except ImportError as error:
    raise pytest.UsageError(f"the vLLM lane needs vLLM (tools/vllm_env.sh builds .venv-vllm): {error}") from error

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# What every vLLM subprocess gets (ENVIRONMENT.md, "vLLM on CPU"); the kernels run in
# Triton's interpreter, so TRITON_INTERPRET must be set before the processes start.
VLLM_ENV = {
    "TRITON_INTERPRET": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_LOGGING_LEVEL": "INFO",
    "TOKENIZERS_PARALLELISM": "false",
}


def vllm_env(plugin: bool, **extra: str) -> dict[str, str]:
    """The environment of a vLLM subprocess with mmkernels' plugin on or off."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMKERNELS_")}
    env.update(VLLM_ENV)
    env["MMKERNELS_DISABLE"] = "0" if plugin else "1"
    env.update(extra)
    return env


@pytest.fixture(scope="session", autouse=True)
def _entry_point_installed():
    # Looked up the way vLLM's processes see it: a fresh interpreter outside the checkout
    # (here `python -m pytest` puts the checkout first on sys.path, whose stale
    # mmkernels.egg-info, if any, would shadow the installed metadata).
    code = (
        "import json; from importlib.metadata import entry_points; "
        "print(json.dumps({e.name: e.value for e in entry_points(group='vllm.general_plugins')}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=60)
    names = json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr[-2000:]}
    if names.get("mmkernels") != "mmkernels.integrations.vllm.plugin:register":
        pytest.fail(
            "the vllm.general_plugins entry point 'mmkernels' is not installed "
            f"(found {names}); reinstall mmkernels (pip install -e .) in this environment"
        )


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, pathlib.Path]:
    """The tiny LLaVA and Qwen2-VL of the zoo, saved in the names vLLM loads."""
    import tiny_models as tm

    root = tmp_path_factory.mktemp("models")
    return {family: tm.write(family, root) for family in tm.FAMILIES}
