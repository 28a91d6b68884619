"""tools/hf_tests_patched/mmkernels_patched.py, the plugin that runs transformers' own
model tests patched: every model built is patched, and the attention switch routes
transformers' default to "mmkernels" (run in a subprocess: the plugin wraps
``PreTrainedModel`` methods for its whole process)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

ROOT = pathlib.Path(__file__).resolve().parent.parent

SCRIPT = r"""
import copy, json, sys
sys.path.insert(0, sys.argv[1])
import mmkernels_patched as plugin
plugin._install()
from mmkernels import zoo
from mmkernels.integrations.engine import is_patched
model = zoo.build("llava").model
seen = {
    "patched": sorted(name for name, m in model.named_modules() if is_patched(m)),
    "text": model.config.text_config._attn_implementation,
    "vision": model.config.vision_config._attn_implementation,
}
explicit = type(model)._from_config(copy.deepcopy(model.config), attn_implementation="eager")
print(json.dumps({
    **seen,
    "explicit_eager": explicit.config.text_config._attn_implementation,
    "explicit_patched": is_patched(explicit.model),
    "stats": dict(plugin._STATS),
}))
"""


def _run(**env) -> dict:
    environment = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1", **env}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(ROOT / "tools" / "hf_tests_patched")],
        capture_output=True, text=True, env=environment, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_model_built_is_patched_and_default_attention_switched():
    seen = _run(MMKERNELS_HF_PATCH="1", MMKERNELS_HF_ATTENTION="default")
    assert "model" in seen["patched"]  # LlavaModel: the merge
    assert seen["text"] == seen["vision"] == "mmkernels"
    assert seen["explicit_eager"] == "eager"  # an explicit request is left alone
    assert seen["explicit_patched"]
    assert seen["stats"]["methods replaced"] > 0


def test_baseline_run_patches_nothing():
    seen = _run(MMKERNELS_HF_PATCH="0", MMKERNELS_HF_ATTENTION="0")
    assert seen["patched"] == []
    assert seen["text"] == "sdpa"
