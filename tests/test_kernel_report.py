"""tools/kernel_report.py: the static (ahead-of-time) kernel report.

The toy kernels below are compiled for sm_80 and sm_90 by the real CLI in a subprocess
(``--extra-module`` imports this file there and reads ``AOT_CASES``): pytest sets
``TRITON_INTERPRET=1`` in conftest, which would make them interpreter functions in this
process, while the script drops the variable before anything imports a kernel. The
subprocess is even given ``TRITON_INTERPRET=1`` to prove that. The parsers and
``check()`` are tested in-process on canned tool output.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from mmkernels.backend import AotCase

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "kernel_report.py"
TOOL_TIMEOUT_S = 300

# --------------------------------------------------------------------------------------
# Toy kernels and their cases (compiled in the subprocess only)


@triton.jit
def toy_copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)


@triton.jit
def toy_gemm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # Row-major A (M, K), B (K, N), C (M, N); shapes are multiples of the blocks.
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(b_ptr + (k + rk)[:, None] * N + rn[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(c_ptr.dtype.element_ty))


@triton.jit
def toy_spill_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    # One warp holds BLOCK fp32 values live across a reduction: 256 per thread, more
    # than the 255 registers a thread can have, so ptxas must spill.
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    total = tl.sum(x * x, axis=0)
    tl.store(y_ptr + offs, x / total)


def _copy_launch(dtype):
    def make_launch():
        n, block = 8192, 1024
        x, y = torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
        return (x, y, n), {"BLOCK": block, "num_warps": 4}, (n // block,)

    return make_launch


def _gemm_launch():
    m = n = k = 256
    a, b, c = (torch.empty(m, k, dtype=torch.bfloat16) for _ in range(3))
    meta = {"BM": 64, "BN": 64, "BK": 32, "num_warps": 4, "num_stages": 3}
    return (a, b, c, m, n, k), meta, (m // 64, n // 64)


def _spill_launch():
    block = 8192
    x, y = torch.empty(block), torch.empty(block)
    return (x, y), {"BLOCK": block, "num_warps": 1}, (1,)


AOT_CASES = [
    AotCase("toy.copy/fp16", toy_copy_kernel, _copy_launch(torch.float16), notes="16-byte aligned"),
    AotCase("toy.copy/bf16", toy_copy_kernel, _copy_launch(torch.bfloat16)),
    AotCase("toy.gemm/bf16", toy_gemm_kernel, _gemm_launch, tensor_cores=True),
    # Must fail --check: a "GEMM" without a dot, and a kernel that spills.
    AotCase("toy.bad.tc-without-dot", toy_copy_kernel, _copy_launch(torch.float16), tensor_cores=True),
    AotCase("toy.bad.spill", toy_spill_kernel, _spill_launch),
]
BAD_CASES = {"toy.bad.tc-without-dot", "toy.bad.spill"}


# --------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(scope="module")
def kernel_report():
    """The tool as a module (importing it changes no environment and imports no kernel)."""
    spec = importlib.util.spec_from_file_location("mmk_kernel_report_under_test", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_tool(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, str(TOOL), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=TOOL_TIMEOUT_S,
    )


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """One CLI run over the toy cases, both targets: (process, records by (case, target))."""
    out = tmp_path_factory.mktemp("kernel_report") / "report.json"
    proc = _run_tool(
        "--check",
        "--skip-registered",
        "--extra-module",
        str(Path(__file__).resolve()),
        "--json",
        str(out),
        env_extra={"TRITON_INTERPRET": "1"},  # the script must drop it itself
    )
    assert out.exists(), f"no JSON written (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    records = json.loads(out.read_text())
    return proc, {(r["case"], r["target"]): r for r in records}


def _both_targets(records, case):
    return [records[(case, "sm_80")], records[(case, "sm_90")]]


# --------------------------------------------------------------------------------------
# The CLI on toy kernels


def test_every_case_and_target_is_reported(toy_run):
    proc, records = toy_run
    assert set(records) == {(c.name, t) for c in AOT_CASES for t in ("sm_80", "sm_90")}
    for record in records.values():
        assert record["error"] is None, record
        assert record["triton"] == triton.__version__
        assert record["registers"] and record["registers"] > 0, record
        for key in ("case", "target", "notes", "num_warps", "num_stages", "shared_bytes", "hmma", "ldg128"):
            assert key in record
    assert records[("toy.copy/fp16", "sm_90")]["notes"] == "16-byte aligned"
    assert "| toy.gemm/bf16 (TC) | sm_90 |" in proc.stdout


def test_aligned_copy_uses_16_byte_accesses(toy_run):
    _, records = toy_run
    for case in ("toy.copy/fp16", "toy.copy/bf16"):
        for r in _both_targets(records, case):
            assert r["ldg128"] >= 1 and r["ldg128"] == r["ldg"], r
            assert r["stg128"] >= 1 and r["stg128"] == r["stg"], r
            assert (r["spill_stores"], r["spill_loads"], r["stack_bytes"], r["local_bytes"]) == (0, 0, 0, 0), r
            assert r["num_warps"] == 4


def test_gemm_uses_tensor_cores(toy_run):
    _, records = toy_run
    sm80, sm90 = _both_targets(records, "toy.gemm/bf16")
    assert sm80["hmma"] > 0 and sm80["ptx_mma_sync"] > 0 and sm80["hgmma"] == 0, sm80
    assert sm90["hgmma"] > 0 and sm90["ptx_wgmma"] > 0, sm90
    # Pipelined (num_stages=3): tiles arrive by 16-byte cp.async, not LDG.
    assert sm80["ldgsts128"] > 0 and sm80["num_stages"] == 3, sm80
    assert sm80["shared_bytes"] > 0 and sm90["shared_bytes"] > 0


def test_spill_is_measured(toy_run):
    _, records = toy_run
    for r in _both_targets(records, "toy.bad.spill"):
        assert r["spill_stores"] > 0 and r["spill_loads"] > 0, r
        assert r["stl"] > 0 and r["ldl"] > 0, r


def test_check_fails_on_exactly_the_bad_cases(toy_run):
    proc, _ = toy_run
    assert proc.returncode == 1, proc.stderr
    flagged = {line.split(" @ ")[0].strip() for line in proc.stderr.splitlines() if " @ sm_" in line}
    assert flagged == BAD_CASES, proc.stderr
    assert "toy.bad.tc-without-dot @ sm_80: tensor_cores=True but no HMMA" in proc.stderr
    assert "toy.bad.tc-without-dot @ sm_90: tensor_cores=True but no HGMMA/QGMMA or HMMA" in proc.stderr
    assert "toy.bad.spill @ sm_80: spills / local memory: spill_stores=" in proc.stderr


def test_only_and_targets_filter(tmp_path):
    out = tmp_path / "r.json"
    proc = _run_tool(
        "--check", "--skip-registered", "--extra-module", str(Path(__file__).resolve()),
        "--only", "toy.copy/fp16", "--targets", "90", "--json", str(out), "--markdown", str(tmp_path / "r.md"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert [(r["case"], r["target"]) for r in json.loads(out.read_text())] == [("toy.copy/fp16", "sm_90")]
    assert "`--check`: passes." in (tmp_path / "r.md").read_text()


def test_check_fails_with_no_cases():
    proc = _run_tool("--check", "--skip-registered")
    assert proc.returncode == 1
    assert "no AOT cases" in proc.stderr


# --------------------------------------------------------------------------------------
# The real registered kernels


def test_registered_kernels_pass_check(tmp_path):
    try:
        from mmkernels.ops import aot_cases

        cases = aot_cases()
    except Exception as exc:  # the ops are being written: report, do not fail here
        pytest.skip(f"mmkernels.ops did not import: {type(exc).__name__}: {exc}")
    if not cases:
        pytest.skip("no AOT cases yet (mmkernels.ops.aot_cases)")
    out = tmp_path / "report.json"
    proc = _run_tool("--check", "--json", str(out))
    assert proc.returncode == 0, f"{proc.stderr}\n{proc.stdout}"
    for case in cases:
        assert f"| {case.name}" in proc.stdout
    # Rows 8- or 16-byte aligned but not at 16-element multiples (K = 1176, head dim 72):
    # the launchers' alignment hints must reach the loads (16-byte cp.async, not element
    # loads); and the GEMM over packed patches (K = 588 padded with zeros to 592) reads them so.
    records = {(r["case"], r["target"]): r for r in json.loads(out.read_text())}
    for name in ("patch_embed/qwen2-vl-7b/bf16", "patch_embed/qwen2-vl-7b/fp32-patches",
                 "patch_embed/clip-l-14-336/fp32-pixels", "varlen_attention/siglip-so400m-d72/bf16"):  # fmt: skip
        for target in ("sm_80", "sm_90"):
            assert records[(name, target)]["ldgsts128"], (name, target, records[(name, target)])


# --------------------------------------------------------------------------------------
# In-process: parsers, check(), refusal of interpreted kernels


def test_parse_resource_usage(kernel_report):
    text = """
Resource usage:
 Common:
  GLOBAL:0
 Function helper:
  REG:12 STACK:16 SHARED:0 LOCAL:0 CONSTANT[0]:392 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function mm:
  REG:108 STACK:0 SHARED:1024 LOCAL:8 CONSTANT[0]:584 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    assert kernel_report.parse_resource_usage(text, "mm") == {
        "registers": 108,
        "stack_bytes": 0,
        "static_shared_bytes": 1024,
        "local_bytes": 8,
    }
    assert kernel_report.parse_resource_usage(text, "absent")["registers"] == 12
    assert kernel_report.parse_resource_usage("garbage") == {}


def test_count_sass(kernel_report):
    sass = """
        /*0100*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0110*/              @!P0 LDG.E.64 R8, desc[UR4][R6.64] ;
        /*0120*/                   LDGSTS.E.BYPASS.128 [R41], desc[UR14][R20.64], P1 ;
        /*0130*/                   LDGSTS.E.64 [R41], desc[UR14][R20.64] ;
        /*0140*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0148*/                   QGMMA.64x64x32.F32.E4M3.E4M3 R24, gdesc[UR4], RZ ;
        /*0150*/               @P1 HMMA.16816.F32.BF16 R0, R4, R8, R0 ;
        /*0160*/                   STL [R1], R3 ;
        /*0170*/                   LDL R3, [R1] ;
        /*0180*/                   STG.E.128 desc[UR4][R2.64], R4 ;
        /*0190*/                   LDS.128 R4, [R2] ;
        /*01a0*/                   UTMALDG.2D [UR8], [UR14], desc[UR16] ;
        /*0000*/ \t.byte\t0xff, 0xff
"""
    counts = kernel_report.count_sass(kernel_report.sass_opcodes(sass))
    assert counts == {
        "hmma": 1, "hgmma": 1, "qgmma": 1, "ldl": 1, "stl": 1, "ldg128": 1, "ldg": 2,
        "stg128": 1, "stg": 1, "ldgsts128": 1, "ldgsts": 2, "utmaldg": 1,
    }  # fmt: skip


def test_parse_ptxas_log(kernel_report):
    log = (
        "ptxas info    : Function properties for k\n"
        "    24 bytes stack frame, 20 bytes spill stores, 16 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 0 barriers\n"
    )
    assert kernel_report.parse_ptxas_log(log) == {"spill_stores": 20, "spill_loads": 16}
    assert kernel_report.parse_ptxas_log("") == {}


def _record(**overrides):
    record = {
        "case": "c", "target": "sm_80", "cc": 80, "error": None, "tensor_cores": False, "tool_notes": [],
        "registers": 40, "spill_stores": 0, "spill_loads": 0, "stack_bytes": 0, "local_bytes": 0,
        "ldl": 0, "stl": 0, "hmma": 0, "hgmma": 0, "ptx_mma_sync": 0, "ptx_wgmma": 0,
    }  # fmt: skip
    record.update(overrides)
    return record


def test_check_rules(kernel_report):
    check = kernel_report.check
    assert check([_record()]) == []
    assert check([]) and "no AOT cases" in check([])[0]
    assert "compile failed: boom" in check([_record(error="boom")])[0]
    assert "spills / local memory: local_bytes=8" in check([_record(local_bytes=8)])[0]
    assert "registers could not be determined" in check([_record(registers=None)])[0]
    # Spills unknown from every source: fails; known from one source (ptxas log): enough.
    no_spill_info = {k: None for k in ("spill_stores", "spill_loads", "stack_bytes", "local_bytes", "ldl", "stl")}
    assert "spills could not be determined" in " ".join(check([_record(**no_spill_info)]))
    assert check([_record(**{**no_spill_info, "spill_stores": 0})]) == []
    # Tensor cores: HMMA on sm_80; HGMMA or HMMA on sm_90; PTX when SASS is unavailable.
    assert check([_record(tensor_cores=True, hmma=8)]) == []
    assert check([_record(tensor_cores=True, hgmma=4)]) != []
    assert check([_record(tensor_cores=True, cc=90, target="sm_90", hgmma=4)]) == []
    assert check([_record(tensor_cores=True, cc=90, target="sm_90", hmma=8)]) == []
    # fp8 on Hopper: QGMMA counts as warpgroup MMA.
    assert check([_record(tensor_cores=True, cc=90, target="sm_90", qgmma=4)]) == []
    assert check([_record(tensor_cores=True, hmma=None, hgmma=None, ptx_mma_sync=4)]) == []
    assert "no mma.sync/wgmma in the PTX" in check([_record(tensor_cores=True, hmma=None, hgmma=None)])[0]


def test_interpreted_kernels_are_refused(kernel_report, capsys):
    from triton.runtime.interpreter import InterpretedFunction

    interpreted = InterpretedFunction(toy_copy_kernel.fn)
    case = AotCase("toy.interpreted", interpreted, _copy_launch(torch.float16))
    with pytest.raises(kernel_report.InterpretedKernelError, match="TRITON_INTERPRET"):
        kernel_report.compile_case(case, 80)
    assert kernel_report.main(["--check"], cases=[case]) == 2
    assert "toy.interpreted" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_missing_tools_give_na_and_fail_check(kernel_report, monkeypatch):
    # A JITFunction built here whatever TRITON_INTERPRET says, compiled in-process.
    from triton.runtime.jit import JITFunction

    case = AotCase("toy.no-tools", JITFunction(toy_copy_kernel.fn), _copy_launch(torch.float16))
    monkeypatch.setattr(kernel_report, "tool_path", lambda name: None)
    record = kernel_report.compile_case(case, 80)
    assert record["error"] is None and record["registers"] is None and record["ldg128"] is None
    assert record["spill_stores"] == 0  # the ptxas -v log needs no extra tool
    assert any("cuobjdump not found" in note for note in record["tool_notes"])
    assert "| n/a |" in kernel_report.render_table([record])
    assert ["registers could not be determined" in p for p in kernel_report.check([record])] == [True]

    def no_log(compiled, cc):
        raise AttributeError("make_cubin")

    monkeypatch.setattr(kernel_report, "_ptxas_log", no_log)
    problems = kernel_report.check([kernel_report.compile_case(case, 90)])
    assert any("spills could not be determined" in p for p in problems), problems


def test_cases_below_their_minimum_target_are_not_built(kernel_report, monkeypatch):
    built = []
    monkeypatch.setattr(kernel_report, "compile_case", lambda case, cc: built.append((case.name, cc)) or {})
    cases = [AotCase("toy.any", toy_copy_kernel, _copy_launch(torch.float16)),
             AotCase("toy.fp8", toy_copy_kernel, _copy_launch(torch.float16), min_compute_capability=89)]  # fmt: skip
    kernel_report.build_records(cases, (80, 90))
    assert built == [("toy.any", 80), ("toy.any", 90), ("toy.fp8", 90)]
