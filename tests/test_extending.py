"""docs/extending.md kept honest: its example op, written to a file exactly as the page
gives it, is a working op (the scaffold of ``mmkernels.backend.Op`` does the rest), and its
family check runs on a real transformers class."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmkernels import backend
from mmkernels.testing import assert_bitwise_equal, assert_close, poison_outputs

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "extending.md"


def _python_blocks() -> list[str]:
    """The page's python code blocks, dedented (a block inside a list item is indented)."""
    blocks = re.findall(r"^( *)```python\n(.*?)^\1```", PAGE.read_text(encoding="utf-8"), re.S | re.M)
    return [re.sub(rf"(?m)^{indent}", "", body) for indent, body in blocks]


def _op_source() -> str:
    return _python_blocks()[0]


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The page's op as a module of its own (Triton reads a kernel's source from its file)."""
    path = tmp_path_factory.mktemp("extending") / "example_scale_rows.py"
    path.write_text(_op_source(), encoding="utf-8")
    spec = importlib.util.spec_from_file_location("mmk_example_scale_rows", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("shape", [(1, 1), (113, 77), (7, 1023), (0, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_example_op_matches_its_reference_in_the_interpreter(example, shape, dtype):
    gen = torch.Generator().manual_seed(0)
    # x is a column slice of a wider buffer: a row stride that is not the row length.
    x = torch.randn(shape[0], shape[1] + 5, generator=gen).to(dtype)[:, 2 : 2 + shape[1]]
    scale = torch.randn(shape[0], generator=gen)
    with poison_outputs():  # an element the kernel does not write stays NaN
        out = example.scale_rows(x, scale)
    want = example.scale_rows_reference(x, scale)
    assert out.shape == x.shape and out.dtype == dtype
    if x.numel():
        assert backend.recent_decisions()[-1] == backend.Decision(example.OP_NAME, backend.Backend.INTERPRETER)
    if dtype == torch.float32:
        assert_bitwise_equal(out, want)  # the fp32 product of two fp32 numbers is correctly rounded
    else:
        assert_close(out, want)
    assert not out.isnan().any()


def test_example_op_routes_float64_to_the_reference_and_replays_plans(example):
    x = torch.randn(5, 9, dtype=torch.float64)
    out = example.scale_rows(x, torch.arange(5.0))
    decision = backend.recent_decisions()[-1]
    assert decision.backend is backend.Backend.REFERENCE and "float64" in decision.reasons[0]
    assert_bitwise_equal(out, example.scale_rows_reference(x, torch.arange(5.0)))
    x = torch.randn(6, 40)
    before = example.OP.plans.replays
    first = example.scale_rows(x, torch.ones(6))
    second = example.scale_rows(x, torch.full((6,), 2.0))  # the same key: the plan replays
    assert example.OP.plans.replays == before + 1
    assert_bitwise_equal(first, x)
    assert_bitwise_equal(second, 2 * x)


def test_example_op_is_registered_with_its_fake_and_names_bad_arguments(example):
    registered = getattr(torch.ops.mmkernels, example.OP_NAME)
    assert str(registered.default._schema) == f"mmkernels::{example.OP_NAME}(Tensor x, Tensor scale) -> Tensor"
    meta = registered(torch.empty(3, 4, device="meta"), torch.empty(3, device="meta"))
    assert meta.shape == (3, 4) and meta.device.type == "meta"
    x = torch.randn(4, 8)
    assert_bitwise_equal(registered(x, torch.ones(4)), x)  # a direct call validates itself
    with pytest.raises(ValueError, match=r"scale: expected shape \(4,\)"):
        example.scale_rows(x, torch.ones(3))
    with pytest.raises(ValueError, match=r"scale: expected shape \(4,\)"):
        registered(x, torch.ones(3))
    with pytest.raises(ValueError, match="x: expected a floating"):
        example.scale_rows(torch.ones(4, 8, dtype=torch.int64), torch.ones(4))
    with pytest.raises(TypeError, match="scale: expected a torch.Tensor"):
        example.scale_rows(x, 2.0)


def test_example_op_compiles_ahead_of_time_for_sm90(example, tmp_path):
    """Its aot_cases() through the kernel report's compile, in a process without the interpreter."""
    script = f"""
import importlib.util, json, sys
sys.path.insert(0, {str(ROOT / "tools")!r})
import kernel_report
spec = importlib.util.spec_from_file_location("mmk_example_scale_rows", {example.__file__!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(json.dumps([kernel_report.compile_case(case, 90) for case in module.aot_cases()]))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["error"] is None, record["error"]
    assert record["case"] == f"{example.OP_NAME}/576x4096/bf16" and record["target"] == "sm_90"
    assert not record["spill_stores"] and not record["spill_loads"], record


def test_family_check_runs_on_a_real_class():
    pytest.importorskip("transformers")
    (block,) = _python_blocks()[1:]
    exec(compile(block, str(PAGE), "exec"), {})
