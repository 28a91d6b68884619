"""Where an op runs, and why.

One place decides, per call, between

* ``Backend.TRITON``: the compiled Triton kernel (CUDA tensors, supported dtype and GPU);
* ``Backend.INTERPRETER``: the same Triton kernel run by Triton's interpreter (CPU
  tensors with ``TRITON_INTERPRET=1`` set before mmkernels was imported); this is how
  kernels are checked on machines without a GPU;
* ``Backend.REFERENCE``: the PyTorch reference, with the reasons the kernel could not
  run. Those reasons are logged (logger ``mmkernels``, DEBUG) and kept in
  :func:`recent_decisions` so the patch report can state them. Never a silent wrong
  answer: anything a kernel does not declare support for goes to the reference.

Kernels declare what they support with :class:`Capabilities` (the xformers
``not_supported_reasons`` habit) and what to compile ahead of time with
:class:`AotCase` (read by ``tools/kernel_report.py``).
"""

from __future__ import annotations

import collections
import contextlib
import enum
import functools
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

log = logging.getLogger("mmkernels")

__all__ = [
    "AotCase",
    "Backend",
    "Capabilities",
    "Decision",
    "aot_cases",
    "choose_backend",
    "compute_capability",
    "empty_output",
    "force_backend",
    "interpreter_enabled",
    "poison_outputs",
    "recent_decisions",
    "register_aot",
]


class Backend(str, enum.Enum):
    TRITON = "triton"
    INTERPRETER = "triton-interpreter"
    REFERENCE = "reference"


def interpreter_enabled() -> bool:
    """True when Triton's interpreter is on.

    Triton reads ``TRITON_INTERPRET`` when ``@triton.jit`` decorates a function, so the
    kernels' mode is fixed when mmkernels' kernel modules are imported; this reads the
    same variable and is checked against each kernel object in :func:`choose_backend`.
    """
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


try:
    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction
except ImportError:  # pragma: no cover - every supported triton has it
    _InterpretedFunction = None


def _is_interpreted(kernel: Any) -> bool:
    return _InterpretedFunction is not None and isinstance(kernel, _InterpretedFunction)


@functools.lru_cache(maxsize=None)
def _compute_capability(index: int) -> tuple[int, int]:
    """Compute capability of CUDA device ``index``, asked once per process: it cannot
    change, and ``torch.cuda.get_device_capability`` is several microseconds of Python
    (device index checks, the properties object) that every op call would pay."""
    return tuple(torch.cuda.get_device_capability(index))


def compute_capability(device: torch.device) -> tuple[int, int]:
    """``(major, minor)`` of CUDA ``device`` (its index, or the current device), cached."""
    return _compute_capability(device.index if device.index is not None else torch.cuda.current_device())


@dataclass(frozen=True)
class Capabilities:
    """What one kernel supports; anything else runs the reference.

    ``dtypes``: floating dtypes of the data the kernel moves or computes with.
    ``min_compute_capability``: for compiled runs on CUDA.
    """

    dtypes: frozenset
    min_compute_capability: tuple[int, int] = (8, 0)

    def not_supported_reasons(self, device: torch.device, dtypes: Iterable[torch.dtype]) -> list[str]:
        reasons = []
        for dt in dtypes:
            if dt not in self.dtypes:
                names = ", ".join(sorted(str(d).replace("torch.", "") for d in self.dtypes))
                reasons.append(f"dtype {str(dt).replace('torch.', '')} not supported (supported: {names})")
        if device.type == "cuda":
            cc = compute_capability(device)
            if cc < self.min_compute_capability:
                reasons.append(
                    f"compute capability {cc[0]}.{cc[1]} < required "
                    f"{self.min_compute_capability[0]}.{self.min_compute_capability[1]}"
                )
        elif device.type == "cpu":
            if not interpreter_enabled():
                reasons.append("CPU tensors and TRITON_INTERPRET is not set (the kernel needs CUDA or the interpreter)")
        else:
            reasons.append(f"device type {device.type!r} has no Triton backend here")
        return reasons


@dataclass(frozen=True)
class Decision:
    op: str
    backend: Backend
    reasons: tuple[str, ...] = ()

    def __str__(self) -> str:
        if not self.reasons:
            return f"{self.op}: {self.backend.value}"
        return f"{self.op}: {self.backend.value} ({'; '.join(self.reasons)})"


_RECENT: collections.deque[Decision] = collections.deque(maxlen=64)
_FORCED = threading.local()


def recent_decisions() -> list[Decision]:
    """The most recent backend decisions (newest last), fallbacks and kernel runs alike."""
    return list(_RECENT)


class force_backend:
    """Scoped override, for tests and benchmarks: ``with force_backend(Backend.REFERENCE): ...``.

    Forcing a kernel backend the inputs cannot use still falls back, with the reason.
    """

    def __init__(self, backend: Backend | str | None):
        self.backend = Backend(backend) if backend is not None else None

    def __enter__(self):
        self._prev = getattr(_FORCED, "value", None)
        _FORCED.value = self.backend
        return self

    def __exit__(self, *exc):
        _FORCED.value = self._prev
        return False


def choose_backend(
    op: str,
    kernel: Any,
    caps: Capabilities,
    device: torch.device,
    dtypes: Iterable[torch.dtype],
    extra_reasons: Iterable[str] = (),
) -> Decision:
    """Pick the backend for one call of ``op`` and record the decision."""
    reasons = list(extra_reasons)
    reasons += caps.not_supported_reasons(device, dtypes)
    forced = getattr(_FORCED, "value", None)
    if not reasons:
        interpreted = _is_interpreted(kernel)
        if device.type == "cpu" and not interpreted:
            reasons.append(
                "TRITON_INTERPRET=1 was set after mmkernels' kernels were imported "
                "(Triton reads it when a kernel is decorated)"
            )
        elif device.type == "cuda" and interpreted:
            reasons.append("kernels were imported with TRITON_INTERPRET=1; CUDA tensors would be copied to the host")
    if forced is Backend.REFERENCE:
        reasons.append("forced by force_backend(REFERENCE)")
    if reasons:
        decision = Decision(op, Backend.REFERENCE, tuple(reasons))
        log.debug("mmkernels: %s", decision)
    else:
        decision = Decision(op, Backend.INTERPRETER if device.type == "cpu" else Backend.TRITON)
    _RECENT.append(decision)
    return decision


_POISON = threading.local()


@contextlib.contextmanager
def poison_outputs():
    """Within this block, outputs allocated by mmkernels' launchers start as NaN, so an
    element a kernel forgot to write shows (see :mod:`mmkernels.testing`)."""
    prev = getattr(_POISON, "on", False)
    _POISON.on = True
    try:
        yield
    finally:
        _POISON.on = prev


# Triton's interpreter patches ``triton.language``'s builtins for the duration of each
# kernel run (module-level state, not per thread), so two threads interpreting kernels at
# once break each other ("Did you forget to add @triton.jit?", seen from 8 threads).
# Interpreted launches are serialised by this lock; compiled launches take none.
_INTERPRETER_LOCK = threading.RLock()


def device_guard(device: torch.device):
    """Context for launching kernels on ``device``; every op launches inside one.

    CUDA: Triton launches on the *current* CUDA device (and allocates there), not on its
    arguments' device, and the custom-op dispatcher sets no device guard; with a model
    spread over GPUs (``device_map="auto"``) an op's tensors may sit on ``cuda:1`` while
    ``cuda:0`` is current. Entered only then (``torch.cuda.device``).
    CPU under the interpreter: the interpreter's lock (see ``_INTERPRETER_LOCK``), so ops
    may be called from several threads. Otherwise it does nothing."""
    if device.type == "cpu":
        return _INTERPRETER_LOCK if interpreter_enabled() else contextlib.nullcontext()
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device.index)


class ValidatedHandOver:
    """Validation once per call, and no dispatcher where it does nothing. Each public op
    validates its arguments (so errors name them, and before the dispatcher routes by a
    stray tensor's device), then runs its custom op, which must validate too since it can
    be called directly (``torch.ops.mmkernels.*``). The wrapper hands its result over for
    exactly that call; the op takes it only when called with the very same tensors (and
    equal scalars), otherwise it validates. Validation was the largest host cost after
    launches in ``tools/host_overhead.py``.

    A plain eager call (see :func:`dispatcher_needed`) runs the op's body straight away:
    the custom-op dispatch costs about 8 us per call (``torch.library.custom_op``, torch
    2.13, this project's CI machine) and does nothing there. Anything that works at the
    dispatcher level (autograd, torch.compile, modes, transforms, the profiler) gets the
    registered op. Not used while ``torch.compile`` traces (the compiled graph calls the
    op without the wrapper)."""

    def __init__(self):
        self._local = threading.local()

    def call(self, op, op_inputs: tuple, args, body=None):
        """``op(*op_inputs)`` with ``args`` (the wrapper's validation) handed over; or
        ``body(*op_inputs)``, the function ``op`` registers, where the dispatcher is not
        needed."""
        if torch.compiler.is_compiling():
            return op(*op_inputs)
        self._local.value = (op_inputs, args)
        try:
            if body is not None and not dispatcher_needed(op_inputs):
                return body(*op_inputs)
            return op(*op_inputs)
        finally:
            self._local.value = None

    def take(self, op_inputs: tuple):
        """The handed-over validation if ``op_inputs`` are what the wrapper passed, else None."""
        value = getattr(self._local, "value", None)
        if value is None:
            return None
        self._local.value = None
        given, args = value
        return args if _same_inputs(given, op_inputs) else None


def dispatcher_needed(op_inputs) -> bool:
    """Whether a call with ``op_inputs`` must go through its registered custom op rather
    than straight to the op's body: autograd (a tensor requires grad), a dispatch or
    function mode (``FakeTensorMode``, ``FlopCounterMode``, ``with torch.device(...)``),
    a functorch transform (``vmap``, ``grad``), tensor subclasses and meta tensors, the
    autograd profiler (it records the op), ``torch.jit`` tracing. Unknown to this torch:
    needed."""
    C = torch._C
    try:
        if (
            torch.jit.is_tracing()
            or C._are_functorch_transforms_active()
            or C._len_torch_dispatch_stack()
            or C._is_torch_function_mode_enabled()
            or C._autograd._profiler_enabled()
        ):
            return True
    except AttributeError:
        return True
    tensors = []
    for value in op_inputs:
        if isinstance(value, torch.Tensor):
            tensors.append(value)
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
            tensors.extend(value)  # a list[Tensor] argument (anything else in it: not plain below)
    if not tensors:
        return False
    if not {type(t) for t in tensors} <= _PLAIN_TENSOR_TYPES:
        return True
    # The public ops reject inputs on different devices before this: the first tells.
    if tensors[0].is_meta:
        return True
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


_PLAIN_TENSOR_TYPES = frozenset({torch.Tensor, torch.nn.Parameter})


def _same_inputs(a: tuple | list, b: tuple | list) -> bool:
    """Element by element: the same tensor objects, equal scalars of one type (lists and
    tuples compared the same way: the dispatcher may rebuild a list argument)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x is y:
            continue
        if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
            if not _same_inputs(x, y):
                return False
        elif isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor) or type(x) is not type(y) or x != y:
            return False
    return True


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host. ``triton.cdiv`` is a constexpr function: called from
    Python it goes through Triton's JIT call machinery (~1-2 us each on a slow host, and a
    launcher makes several per call), which the host-overhead profile showed."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= ``n`` on the host (0 for 0, as ``triton.next_power_of_2``);
    see :func:`cdiv`."""
    return n if n <= 1 else 1 << (n - 1).bit_length()


def aligned_elements(tensors, strides) -> int:
    """An alignment hint for a kernel: the largest power-of-two element count, at most 16
    bytes, that divides every stride in ``strides`` and every tensor's base address, so
    rows start on such boundaries and loads may be vectors of that many elements. 1 when
    every stride is a multiple of 16 elements: the JIT proves that itself, and restating
    it as a smaller multiple would lower what it knows. The kernel applies it as
    ``x = (x // A) * A`` (``tl.multiple_of`` on a scalar argument has no effect)."""
    strides = list(strides)
    if all(st % 16 == 0 for st in strides):
        return 1
    size = tensors[0].element_size()
    align = max(16 // size, 1)
    while align > 1 and any(t.data_ptr() % (align * size) or any(st % align for st in strides) for t in tensors):
        align //= 2
    return align


def empty_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """How launchers allocate outputs: ``torch.empty``, or NaN under :func:`poison_outputs`."""
    if getattr(_POISON, "on", False):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# --------------------------------------------------------------------------------------
# Ahead-of-time compile cases, read by tools/kernel_report.py


@dataclass(frozen=True)
class AotCase:
    """One kernel launch to compile ahead of time for sm_80 and sm_90.

    ``make_launch()`` returns ``(args, meta, grid)``: the positional arguments as CPU
    tensors of the shapes that matter (the JIT specializes on divisibility by 16, so use
    the real shapes), the keyword meta-parameters (constexprs plus ``num_warps`` /
    ``num_stages``) exactly as the op's launcher would pass them, and the grid. The op
    builds them with the same heuristic its launcher uses, so the report sees the real
    configuration. ``tensor_cores``: the kernel is a GEMM that must use mma/wgmma.
    ``min_compute_capability``: as ``major * 10 + minor``; lower targets are not built
    (fp8 kernels: 89, Triton refuses e4m3 below sm_89 and the op runs the reference there).
    """

    name: str
    kernel: Any
    make_launch: Callable[[], tuple[tuple, dict, tuple]]
    tensor_cores: bool = False
    notes: str = ""
    min_compute_capability: int = 0


_AOT: dict[str, AotCase] = {}


def register_aot(case: AotCase) -> AotCase:
    if case.name in _AOT:
        raise ValueError(f"AOT case {case.name!r} is already registered")
    _AOT[case.name] = case
    return case


def aot_cases() -> list[AotCase]:
    """Every registered AOT case (importing :mod:`mmkernels.ops` registers them all)."""
    import mmkernels.ops  # noqa: F401  (registration happens at import)

    return list(_AOT.values())
