#!/usr/bin/env python3
"""Static kernel report: every registered kernel compiled ahead of time for sm_80 / sm_90.

    python tools/kernel_report.py [--check] [--json PATH] [--markdown PATH]
                                  [--targets 80,90] [--only SUBSTRING]
                                  [--extra-module PATH_OR_NAME ...] [--skip-registered]

No GPU is needed. Each kernel declares its launches next to itself as
:class:`mmkernels.backend.AotCase` (real CPU tensors of the shapes that matter, the meta
parameters its launcher passes, the grid). For every case and target the tool installs a
stand-in Triton driver that claims to be that GPU and calls the kernel's own
``warmup(*args, grid=grid, **meta)``, so the JIT specializes exactly as it would on the
device (divisibility by 16, stride 1, constexprs), then reads the binary with the
``cuobjdump`` and ``nvdisasm`` shipped in the triton wheel. A Markdown table goes to
stdout (and ``--markdown``); ``--json`` writes one record per case and target.

Columns (JSON key in brackets):

* ``warps/stages`` [num_warps, num_stages]: the launch configuration compiled.
* ``regs`` [registers]: registers per thread in the cubin (cuobjdump ``REG``). More than
  ~128 at 8 warps or ~255 at all limits occupancy and precedes spills.
* ``spill st/ld`` [spill_stores, spill_loads]: bytes ptxas spilled to and reloaded from
  local memory, from its ``-v`` log (the same ptxas call Triton makes, re-run on the PTX).
  Spills are slow (local memory is off-chip); ``--check`` fails on any.
* ``stack`` / ``local`` [stack_bytes, local_bytes]: per-thread stack frame and local
  memory in the cubin (cuobjdump ``STACK`` / ``LOCAL``). Non-zero means local memory use:
  spills, or an array the compiler could not keep in registers.
* ``LDL/STL`` [ldl, stl]: local-memory load/store instructions in the SASS, the spills
  (or local arrays) as the hardware runs them.
* ``smem`` [shared_bytes]: dynamic shared memory the launch requests (Triton's
  ``metadata.shared``: pipeline buffers, layout conversions, reductions); the cubin's
  static shared memory is in [static_shared_bytes]. It bounds CTAs per SM (228 KB per SM
  on H100, 164 KB on A100).
* ``HMMA`` / ``HGMMA`` [hmma, hgmma]: tensor-core instructions in the SASS. HMMA is the
  warp-level ``mma.sync`` (Ampere, and Hopper's fallback); HGMMA is Hopper's
  warpgroup ``wgmma``, the only way to reach its full tensor-core rate.
* ``mma.sync/wgmma`` [ptx_mma_sync, ptx_wgmma]: the same in the PTX (what Triton asked
  for, before ptxas).
* ``LDG.128/LDG``, ``STG.128/STG`` [ldg128, ldg, stg128, stg]: 16-byte global loads /
  stores out of all global loads / stores in the SASS. A memory-bound kernel should move
  its data with 16-byte accesses (the JIT proves alignment from divisibility-by-16
  specialization); narrower ones mean lost alignment or a bad layout.
* ``LDGSTS.128`` [ldgsts128]: 16-byte asynchronous global-to-shared copies (``cp.async``).
  Pipelined GEMMs (num_stages > 1) load their tiles this way instead of ``LDG``, so they
  count as 16-byte loads too. [ldgsts] counts every width.
* ``UTMALDG`` [utmaldg]: tile loads by Hopper's tensor memory accelerator (TMA), issued
  from a tensor descriptor by one thread for the whole tile (sm_90+; kernels that read
  through ``TensorDescriptor``s).

A value that a missing tool could not provide is ``n/a`` (``null`` in JSON), with the
reason in [tool_notes]. ``--check`` exits 1 and names the case and the reason on: a
compile failure, any spill or local memory use, registers or spills that could not be
determined at all, a ``tensor_cores=True`` case without HMMA (sm_80) / HGMMA or HMMA
(sm_90) in its SASS, and zero cases.

Kernels must be real ``JITFunction`` objects: the script removes ``TRITON_INTERPRET``
from the environment before anything imports mmkernels, and refuses (exit 2) if the
kernels were already decorated as interpreted functions. As a library
(``compile_case``, ``check``, ``render_markdown``, ``main``) it changes no environment.
"""

import os

if __name__ == "__main__":
    # Triton reads TRITON_INTERPRET when @triton.jit decorates a kernel: drop it before
    # anything imports mmkernels, so the kernels are JITFunctions that can be compiled.
    os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # run from anywhere: `mmkernels` is importable

DEFAULT_TARGETS = (80, 90)
_DEVICE_ID_BASE = 10_000  # stand-in device ids: one per target, clear of real GPUs' ids
_TOOL_TIMEOUT_S = 120

# Every measured key of a record, and those that show local memory use (spills).
_ALL_MEASURES = (
    "num_warps",
    "num_stages",
    "registers",
    "spill_stores",
    "spill_loads",
    "stack_bytes",
    "local_bytes",
    "ldl",
    "stl",
    "shared_bytes",
    "static_shared_bytes",
    "hmma",
    "hgmma",
    "qgmma",
    "ptx_mma_sync",
    "ptx_wgmma",
    "ldg128",
    "ldg",
    "stg128",
    "stg",
    "ldgsts128",
    "ldgsts",
    "utmaldg",
)
_SPILL_KEYS = ("spill_stores", "spill_loads", "stack_bytes", "local_bytes", "ldl", "stl")


class InterpretedKernelError(RuntimeError):
    """A case's kernel was decorated under TRITON_INTERPRET=1 and cannot be compiled."""


# --------------------------------------------------------------------------------------
# The stand-in driver


def _stand_in_driver_class():
    from triton.backends.driver import DriverBase

    class StandInDriver(DriverBase):
        """Claims to be a CUDA GPU of compute capability ``cc``, for ``warmup`` only."""

        def __init__(self, cc: int):
            super().__init__()
            self.cc = cc

        @classmethod
        def is_active(cls):
            return True

        def get_current_target(self):
            from triton.backends.compiler import GPUTarget

            return GPUTarget("cuda", self.cc, 32)

        def get_current_device(self):
            # The JIT keeps one kernel cache per device id: one id per target, or the
            # sm_90 warmup silently returns the cached sm_80 binary.
            return _DEVICE_ID_BASE + self.cc

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            import torch

            return torch.device("cpu")

        def map_python_to_cpp_type(self, ty):
            raise NotImplementedError("stand-in driver: no launcher is built ahead of time")

        def get_benchmarker(self):
            raise NotImplementedError("stand-in driver: nothing runs ahead of time")

    # Another triton version may add abstract methods: stub them so the class instantiates.
    missing = sorted(getattr(StandInDriver, "__abstractmethods__", ()))
    if missing:
        stubs = {name: _not_supported(name) for name in missing}
        StandInDriver = type("StandInDriver", (StandInDriver,), stubs)
    return StandInDriver


def _not_supported(name):
    def method(self, *args, **kwargs):
        raise NotImplementedError(f"stand-in driver: {name} is not available ahead of time")

    return method


@contextlib.contextmanager
def target_driver(cc: int):
    """Within this block Triton's active driver is a stand-in GPU of capability ``cc``.

    The previous driver object is put back afterwards (``reset_active()`` would try to
    create a real driver, which fails on a machine without a GPU).
    """
    from triton.runtime import driver

    previous = getattr(driver, "_active", None)
    driver.set_active(_stand_in_driver_class()(cc))
    try:
        yield
    finally:
        driver.set_active(previous)


# --------------------------------------------------------------------------------------
# Kernels and compiling


def _innermost(kernel):
    """The JITFunction (or InterpretedFunction) under heuristics/autotune wrappers."""
    from triton.runtime.jit import JITFunction

    interpreted = _interpreted_type()
    seen = 0
    while not isinstance(kernel, (JITFunction, *interpreted)) and hasattr(kernel, "fn") and seen < 8:
        kernel, seen = kernel.fn, seen + 1
    return kernel


def _interpreted_type() -> tuple:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - triton 3.6 to 3.9 all have it
        return ()
    return (InterpretedFunction,)


def ensure_compilable(cases) -> None:
    """Raise :class:`InterpretedKernelError` naming the cases whose kernels are interpreted."""
    interpreted = _interpreted_type()
    bad = [case.name for case in cases if interpreted and isinstance(_innermost(case.kernel), interpreted)]
    if bad:
        raise InterpretedKernelError(
            "the kernels of these cases were imported as Triton interpreter functions "
            "(TRITON_INTERPRET=1 was set when they were decorated) and cannot be compiled: "
            + ", ".join(bad)
            + ". Run `python tools/kernel_report.py` in a process without TRITON_INTERPRET "
            "(the script removes it itself when nothing imported the kernels before)."
        )


def _compile(case, cc: int):
    """The CompiledKernel of ``case`` for sm_<cc>, through the kernel's own warmup."""
    args, meta, grid = case.make_launch()
    with target_driver(cc):
        compiled = case.kernel.warmup(*args, grid=grid, **meta)
    if isinstance(compiled, (list, tuple)):  # an autotuner warms up every config
        if len(compiled) != 1:
            raise ValueError(
                f"warmup compiled {len(compiled)} configs; register one AotCase per config "
                "with the inner kernel and explicit meta-parameters"
            )
        compiled = compiled[0]
    return compiled


def compile_case(case, cc: int) -> dict:
    """Compile ``case`` for sm_<cc> and measure it. Returns one report record.

    A compile failure is recorded (``error``), not raised; an interpreted kernel raises
    :class:`InterpretedKernelError`.
    """
    ensure_compilable([case])
    record = _base_record(case, cc)
    try:
        compiled = _compile(case, cc)
    except Exception as exc:  # any compile failure is a finding of the report
        record["error"] = _one_line(exc)
        return record
    try:
        record.update(measure(compiled, cc))
    except Exception as exc:  # e.g. no cubin in asm: a finding too, not a crash
        record["error"] = "compiled, but measuring failed: " + _one_line(exc)
    return record


def _base_record(case, cc: int) -> dict:
    import triton

    record = {
        "case": case.name,
        "target": f"sm_{cc}",
        "cc": cc,
        "triton": triton.__version__,
        "kernel": getattr(_innermost(case.kernel), "__name__", None) or repr(case.kernel),
        "tensor_cores": bool(case.tensor_cores),
        "notes": case.notes,
        "error": None,
        "tool_notes": [],
    }
    for key in _ALL_MEASURES:
        record[key] = None
    return record


def _one_line(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------
# Measuring a compiled kernel


def measure(compiled, cc: int) -> dict:
    """Every column for one CompiledKernel (missing tools leave ``None`` and a tool note)."""
    meta = compiled.metadata
    out = {
        "num_warps": getattr(meta, "num_warps", None),
        "num_stages": getattr(meta, "num_stages", None),
        "shared_bytes": getattr(meta, "shared", None),
        "tool_notes": [],
    }
    out.update(ptx_counts(compiled.asm.get("ptx", "")))
    cubin = compiled.asm.get("cubin")
    name = getattr(meta, "name", None)
    with tempfile.TemporaryDirectory(prefix="mmk-kernel-report-") as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        _merge(out, _resource_usage(path, name))
        _merge(out, _sass(path))
    _merge(out, _ptxas_spills(compiled, cc))
    return out


def _merge(out: dict, part: dict) -> None:
    notes = part.pop("tool_notes", [])
    out.update(part)
    out["tool_notes"].extend(notes)


def ptx_counts(ptx: str) -> dict:
    """Tensor-core instructions in the PTX: ``mma.sync`` (sm_80) and ``wgmma.mma_async`` (sm_90)."""
    return {
        "ptx_mma_sync": len(re.findall(r"^\s*(?:@!?%?\w+\s+)?mma\.sync\b", ptx, re.M)),
        "ptx_wgmma": len(re.findall(r"^\s*(?:@!?%?\w+\s+)?wgmma\.mma_async\b", ptx, re.M)),
    }


def tool_path(name: str):
    """Path of a CUDA tool shipped in the triton wheel (or set through triton's knobs), or None."""
    candidates = []
    try:
        from triton import knobs

        candidates.append(getattr(knobs.nvidia, name).path)
    except Exception:  # older/newer triton without this knob, or the tool is missing
        pass
    import triton

    candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name))
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def _run_tool(name: str, *args) -> tuple:
    """(stdout, None) or (None, why not)."""
    path = tool_path(name)
    if path is None:
        return None, f"{name} not found in this triton"
    try:
        proc = subprocess.run([path, *map(str, args)], capture_output=True, text=True, timeout=_TOOL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{name}: {_one_line(exc)}"
    if proc.returncode != 0:
        return None, f"{name} exited {proc.returncode}: {' '.join(proc.stderr.split())[:200]}"
    return proc.stdout, None


_RESOURCE_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def parse_resource_usage(text: str, function: str = None) -> dict:
    """cuobjdump ``--dump-resource-usage`` output -> registers, stack, static shared, local.

    With several functions (non-inlined callees), the entry named ``function`` is taken,
    else the first one listed.
    """
    found = {}
    current = None
    for line in text.splitlines():
        header = re.match(r"\s*Function\s+(\S+?):\s*$", line)
        if header:
            current = header.group(1)
            continue
        usage = _RESOURCE_RE.search(line)
        if usage and current is not None and current not in found:
            found[current] = tuple(int(v) for v in usage.groups())
    if not found:
        return {}
    regs, stack, shared, local = found.get(function) or next(iter(found.values()))
    return {"registers": regs, "stack_bytes": stack, "static_shared_bytes": shared, "local_bytes": local}


def _resource_usage(cubin: Path, function) -> dict:
    text, why = _run_tool("cuobjdump", "--dump-resource-usage", cubin)
    if text is None:
        return {"tool_notes": [why]}
    parsed = parse_resource_usage(text, function)
    if not parsed:
        return {"tool_notes": ["cuobjdump: no resource usage line in its output"]}
    return parsed


_SASS_OPCODE_RE = re.compile(r"^\s*/\*[0-9a-fA-F]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")


def sass_opcodes(sass: str) -> list:
    """The opcode (with modifiers, e.g. ``LDG.E.128``) of every SASS instruction."""
    opcodes = []
    for line in sass.splitlines():
        match = _SASS_OPCODE_RE.match(line)
        if match:
            opcodes.append(match.group(1))
    return opcodes


def count_sass(opcodes) -> dict:
    """Tensor-core, local-memory, global-access and TMA-load counts from SASS opcodes."""
    base_keys = {"HMMA": "hmma", "HGMMA": "hgmma", "QGMMA": "qgmma", "LDL": "ldl", "STL": "stl"}
    base_keys.update({"LDG": "ldg", "STG": "stg", "LDGSTS": "ldgsts", "UTMALDG": "utmaldg"})
    wide_keys = {"LDG": "ldg128", "STG": "stg128", "LDGSTS": "ldgsts128"}
    counts = dict.fromkeys([*base_keys.values(), *wide_keys.values()], 0)
    for opcode in opcodes:
        base, *modifiers = opcode.split(".")
        if base in base_keys:
            counts[base_keys[base]] += 1
        if base in wide_keys and "128" in modifiers:
            counts[wide_keys[base]] += 1
    return counts


def _sass(cubin: Path) -> dict:
    text, why = _run_tool("nvdisasm", "--print-code", cubin)
    if text is None:
        # cuobjdump can print SASS too, when nvdisasm is the missing one.
        text, why2 = _run_tool("cuobjdump", "--dump-sass", cubin)
        if text is None:
            return {"tool_notes": [why, why2]}
    opcodes = sass_opcodes(text)
    if not opcodes:
        return {"tool_notes": ["no SASS instructions found in the disassembly"]}
    return count_sass(opcodes)


_PTXAS_SPILL_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas_log(log: str) -> dict:
    """``ptxas -v`` log -> spill stores / loads in bytes (summed over functions)."""
    matches = _PTXAS_SPILL_RE.findall(log)
    if not matches:
        return {}
    return {
        "spill_stores": sum(int(m[1]) for m in matches),
        "spill_loads": sum(int(m[2]) for m in matches),
    }


def _ptxas_spills(compiled, cc: int) -> dict:
    """Re-run the ptxas call Triton made (its backend's ``make_cubin``) with its log shown."""
    try:
        log = _ptxas_log(compiled, cc)
    except Exception as exc:  # an API change in triton: report n/a, check() falls back
        return {"tool_notes": [f"ptxas -v log unavailable: {_one_line(exc, 200)}"]}
    parsed = parse_ptxas_log(log)
    if not parsed:
        return {"tool_notes": ["ptxas -v log had no spill line"]}
    return parsed


def _ptxas_log(compiled, cc: int) -> str:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", cc, 32))
    metadata = compiled.metadata._asdict()
    options = backend.parse_options(dict(metadata))
    captured = io.StringIO()
    previous = os.environ.get("TRITON_DUMP_PTXAS_LOG")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # make_cubin prints the -v log to stdout
    try:
        with contextlib.redirect_stdout(captured):
            backend.make_cubin(compiled.asm["ptx"], metadata, options, cc)
    finally:
        if previous is None:
            os.environ.pop("TRITON_DUMP_PTXAS_LOG", None)
        else:
            os.environ["TRITON_DUMP_PTXAS_LOG"] = previous
    return captured.getvalue()


# --------------------------------------------------------------------------------------
# Checking


def check(records) -> list:
    """Everything ``--check`` fails on, one line per finding ("case @ sm_XX: why")."""
    records = list(records)
    if not records:
        return ["no AOT cases: mmkernels.ops.aot_cases() made none (or all were filtered out)"]
    problems = []
    for record in records:
        where = f"{record['case']} @ {record['target']}"
        problems += [f"{where}: {why}" for why in _record_problems(record)]
    return problems


def _record_problems(record: dict) -> list:
    if record.get("error"):
        return [f"compile failed: {record['error']}"]
    problems = []
    if record.get("registers") is None:
        problems.append("registers could not be determined (" + "; ".join(record.get("tool_notes") or ["?"]) + ")")
    known = {key: record.get(key) for key in _SPILL_KEYS if record.get(key) is not None}
    if not known:
        problems.append("spills could not be determined (" + "; ".join(record.get("tool_notes") or ["?"]) + ")")
    used = {key: value for key, value in known.items() if value > 0}
    if used:
        problems.append("spills / local memory: " + ", ".join(f"{k}={v}" for k, v in used.items()))
    if record.get("tensor_cores"):
        problems += _tensor_core_problems(record)
    return problems


def _tensor_core_problems(record: dict) -> list:
    cc = record["cc"]
    hmma = record.get("hmma")
    # Hopper's warpgroup MMA: HGMMA (bf16/fp16/tf32) or QGMMA (fp8).
    hgmma = None if record.get("hgmma") is None else record["hgmma"] + (record.get("qgmma") or 0)
    if hmma is None and hgmma is None:  # no SASS: judge by the PTX, and say so
        ok = bool(record.get("ptx_mma_sync")) or (cc >= 90 and bool(record.get("ptx_wgmma")))
        return [] if ok else ["tensor_cores=True but no mma.sync/wgmma in the PTX (SASS unavailable)"]
    if cc >= 90:
        return [] if (hgmma or hmma) else ["tensor_cores=True but no HGMMA/QGMMA or HMMA in the SASS"]
    return [] if hmma else ["tensor_cores=True but no HMMA in the SASS"]


# --------------------------------------------------------------------------------------
# Output


def _cell(value) -> str:
    return "n/a" if value is None else str(value)


def _pair(record: dict, a: str, b: str) -> str:
    return f"{_cell(record.get(a))}/{_cell(record.get(b))}"


_COLUMNS = (
    ("case", lambda r: r["case"] + (" (TC)" if r["tensor_cores"] else "")),
    ("target", lambda r: r["target"]),
    ("warps/stages", lambda r: _pair(r, "num_warps", "num_stages")),
    ("regs", lambda r: _cell(r.get("registers"))),
    ("spill st/ld B", lambda r: _pair(r, "spill_stores", "spill_loads")),
    ("stack/local B", lambda r: _pair(r, "stack_bytes", "local_bytes")),
    ("LDL/STL", lambda r: _pair(r, "ldl", "stl")),
    ("smem B", lambda r: _cell(r.get("shared_bytes"))),
    ("HMMA", lambda r: _cell(r.get("hmma"))),
    ("HGMMA", lambda r: _cell(r.get("hgmma"))),
    ("QGMMA", lambda r: _cell(r.get("qgmma"))),
    ("mma.sync/wgmma", lambda r: _pair(r, "ptx_mma_sync", "ptx_wgmma")),
    ("LDG.128/LDG", lambda r: _pair(r, "ldg128", "ldg")),
    ("STG.128/STG", lambda r: _pair(r, "stg128", "stg")),
    ("LDGSTS.128", lambda r: _cell(r.get("ldgsts128"))),
    ("UTMALDG", lambda r: _cell(r.get("utmaldg"))),
    ("notes", lambda r: _notes_cell(r)),
)


def _notes_cell(record: dict) -> str:
    parts = []
    if record.get("error"):
        parts.append("**compile failed**: " + record["error"])
    if record.get("notes"):
        parts.append(record["notes"])
    parts += record.get("tool_notes") or []
    return "; ".join(parts).replace("|", "\\|")


def render_table(records) -> str:
    header = "| " + " | ".join(name for name, _ in _COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in _COLUMNS) + "|"
    rows = ["| " + " | ".join(cell(r) for _, cell in _COLUMNS) + " |" for r in records]
    return "\n".join([header, rule, *rows])


def render_markdown(records, problems=None) -> str:
    """The report as a Markdown document: table, then what ``--check`` would say."""
    import triton

    lines = [
        "# Kernel report (ahead-of-time, no GPU)",
        "",
        f"Generated by `python tools/kernel_report.py` with triton {triton.__version__}. "
        "Columns are explained in the tool's docstring; (TC) marks cases that must use tensor cores.",
        "",
        render_table(records) if records else "_No AOT cases registered._",
    ]
    problems = check(records) if problems is None else problems
    lines += ["", "`--check`: " + ("passes." if not problems else f"{len(problems)} problem(s):")]
    lines += [f"- {p}" for p in problems]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# Cases and CLI


def load_module(spec: str):
    """Import ``spec``: a path to a ``.py`` file or a dotted module name."""
    if spec.endswith(".py") or os.sep in spec:
        path = Path(spec).resolve()
        name = "_kernel_report_extra_" + re.sub(r"\W", "_", path.stem)
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None:
            raise ImportError(f"cannot import {spec}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
        return module
    return importlib.import_module(spec)


def collect_cases(extra_modules=(), skip_registered: bool = False) -> list:
    """mmkernels' cases (:func:`mmkernels.ops.aot_cases`, unless skipped), then each extra
    module's ``AOT_CASES`` (a list of :class:`mmkernels.backend.AotCase`). The first case
    of a name wins."""
    cases = {}
    if not skip_registered:
        from mmkernels.ops import aot_cases

        cases.update((case.name, case) for case in aot_cases())
    for spec in extra_modules:
        for case in getattr(load_module(spec), "AOT_CASES", ()):
            cases.setdefault(case.name, case)
    return list(cases.values())


def _parse_targets(text: str) -> tuple:
    try:
        targets = tuple(int(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--targets wants compute capabilities like 80,90, got {text!r}")
    if not targets or any(t < 70 for t in targets):
        raise argparse.ArgumentTypeError(f"--targets wants capabilities of 70 or more, got {text!r}")
    return targets


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 on spills, missing tensor cores, compile failures or no cases"
    )
    parser.add_argument("--json", metavar="PATH", help="write the records as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="write the Markdown report to PATH too")
    parser.add_argument(
        "--targets", type=_parse_targets, default=DEFAULT_TARGETS, help="compute capabilities (default 80,90)"
    )
    parser.add_argument("--only", metavar="SUBSTRING", help="only cases whose name contains SUBSTRING")
    parser.add_argument(
        "--extra-module",
        action="append",
        default=[],
        metavar="PATH_OR_NAME",
        help="also import this module and report its AOT_CASES (repeatable)",
    )
    parser.add_argument("--skip-registered", action="store_true", help="leave out mmkernels' own registered cases")
    return parser


def build_records(cases, targets) -> list:
    # A case with min_compute_capability (e.g. fp8: 89) is not built for lower targets.
    return [compile_case(case, cc) for case in cases for cc in targets if cc >= case.min_compute_capability]


def main(argv=None, cases=None) -> int:
    """The CLI. ``cases`` (a list of AotCase) replaces case collection, for tests."""
    args = _parser().parse_args(argv)
    try:
        if cases is None:
            cases = collect_cases(args.extra_module, args.skip_registered)
        if args.only:
            cases = [c for c in cases if args.only in c.name]
        ensure_compilable(cases)
    except InterpretedKernelError as exc:
        print(f"kernel_report: {exc}", file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        # triton 3.9 warns once that its FP-fusion default will change; the report
        # compiles with the default the kernels get at run time, so the note is noise.
        warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
        records = build_records(cases, args.targets)
    problems = check(records)
    report = render_markdown(records, problems)
    sys.stdout.write(report)
    _write_outputs(args, records, report)
    if args.check and problems:
        print(f"kernel_report --check: {len(problems)} problem(s)", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    return 0


def _write_outputs(args, records, report: str) -> None:
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(records, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(report)


if __name__ == "__main__":
    sys.exit(main())
