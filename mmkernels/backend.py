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
import dataclasses
import enum
import functools
import itertools
import logging
import os
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from mmkernels import routes as _routes

log = logging.getLogger("mmkernels")

__all__ = [
    "AotCase",
    "Backend",
    "CallPlans",
    "Capabilities",
    "Decision",
    "Needs",
    "Op",
    "aot_cases",
    "call_plans_enabled",
    "clear_call_plans",
    "choose_backend",
    "compute_capability",
    "empty_output",
    "force_backend",
    "interpreter_enabled",
    "is_interpreted",
    "launch",
    "poison_outputs",
    "recent_decisions",
    "refresh_environment",
    "register_aot",
    "resolve_check",
]


class Backend(str, enum.Enum):
    TRITON = "triton"
    INTERPRETER = "triton-interpreter"
    REFERENCE = "reference"


def _read_interpreter_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


_ENV = {"interpret": _read_interpreter_env()}


def interpreter_enabled() -> bool:
    """True when Triton's interpreter is on.

    Triton reads ``TRITON_INTERPRET`` when ``@triton.jit`` decorates a function, so the
    kernels' mode is fixed when mmkernels' kernel modules are imported; this reads the
    same variable, once, when mmkernels is imported (an environment read is microseconds
    of Python that every op call would pay): :func:`refresh_environment` reads it again.
    It is checked against each kernel object in :func:`choose_backend`.
    """
    return _ENV["interpret"]


def refresh_environment() -> None:
    """Read again the environment variables mmkernels reads once (``TRITON_INTERPRET``,
    ``MMKERNELS_DEBUG_CHECKS``, any made with :func:`env_flag`) and forget the backend decisions
    made under the old values. For tests and tools that change the environment after
    import; a process that sets its environment before importing mmkernels never needs it."""
    _ENV["interpret"] = _read_interpreter_env()
    for refresh in list(_ENV_REFRESHERS):
        refresh()
    clear_decision_cache()


_ENV_REFRESHERS: list[Callable[[], None]] = []


def env_flag(name: str) -> Callable[[], bool]:
    """A cached reader of the boolean environment variable ``name`` ("1", "true", "yes",
    "on"): read now and again by :func:`refresh_environment`, not on every call."""
    state = [False]

    def read():
        state[0] = os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")

    read()
    _ENV_REFRESHERS.append(read)
    return lambda: state[0]


try:
    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction
except ImportError:  # pragma: no cover - every supported triton has it
    _InterpretedFunction = None


def _is_interpreted(kernel: Any) -> bool:
    return _InterpretedFunction is not None and isinstance(kernel, _InterpretedFunction)


def is_interpreted(kernel: Any) -> bool:
    """Whether ``kernel`` runs in Triton's interpreter (decorated under TRITON_INTERPRET=1):
    the kernel object says so for certain, and asking it costs no environment read."""
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
    """One call's backend, the reasons for the reference, and for an op with routes the
    route a table (or :func:`mmkernels.routes.force_route`) chose and where that came from
    ("measured" on this GPU, "shipped", "forced"); ``route`` None: the op's heuristic."""

    op: str
    backend: Backend
    reasons: tuple[str, ...] = ()
    route: str | None = None
    route_source: str | None = None

    def __str__(self) -> str:
        text = f"{self.op}: {self.backend.value}"
        if self.route is not None:
            text += f" via {self.route} ({self.route_source})"
        return text if not self.reasons else f"{text} ({'; '.join(self.reasons)})"


_RECENT: collections.deque[tuple[int, Decision]] = collections.deque(maxlen=64)  # (sequence number, decision)
_SEQUENCE = itertools.count(1)  # numbers every recorded decision: cached decisions repeat as objects


class _ForcedState(threading.local):
    value = None  # the class default: a missing thread attribute would cost an exception


_FORCED = _ForcedState()


def recent_decisions() -> list[Decision]:
    """The most recent backend decisions (newest last), fallbacks and kernel runs alike."""
    return [decision for _, decision in _RECENT]


def decision_mark() -> int:
    """A mark for :func:`decisions_since`: the number of the newest recorded decision."""
    return _RECENT[-1][0] if _RECENT else 0


def decisions_since(mark: int) -> list[Decision]:
    """The decisions recorded after :func:`decision_mark` returned ``mark`` (those still in
    the bounded log), oldest first. By number, not identity: a cached decision is the same
    object every call."""
    return [decision for number, decision in _RECENT if number > mark]


class force_backend:
    """Scoped override, for tests and benchmarks: ``with force_backend(Backend.REFERENCE): ...``.

    Forcing a kernel backend the inputs cannot use still falls back, with the reason.
    """

    def __init__(self, backend: Backend | str | None):
        self.backend = Backend(backend) if backend is not None else None

    def __enter__(self):
        self._prev = _FORCED.value
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
    """Pick the backend for one call of ``op`` and record the decision.

    Decided once per (op, kernel, capabilities, device, dtypes, extra reasons, forced
    backend) and then looked up: none of these inputs can change between two calls with
    the same key (compute capability and the interpreter flag are read once, see
    :func:`refresh_environment`), and building the reasons was several microseconds of
    every call. A :class:`force_backend` scope is part of the key, so it still forces."""
    return record_decision(decide_backend(op, kernel, caps, device, dtypes, extra_reasons))


def decide_backend(op: str, kernel: Any, caps: Capabilities, device: torch.device, dtypes: Iterable[torch.dtype],
                   extra_reasons: Iterable[str] = ()) -> Decision:  # fmt: skip
    """:func:`choose_backend` without recording the decision (see :func:`record_decision`)."""
    forced = _FORCED.value
    extra = tuple(extra_reasons)
    try:
        key = (op, kernel, caps, device, frozenset(dtypes), extra, forced)
        decision = _DECISIONS.get(key)
    except TypeError:  # something unhashable: decide without the cache
        key, decision = None, None
    if decision is None:
        decision = _decide(op, kernel, caps, device, key[4] if key else dtypes, extra, forced)
        if key is not None:
            if len(_DECISIONS) >= 512:
                _DECISIONS.clear()
            _DECISIONS[key] = decision
    return decision


def record_decision(decision: Decision) -> Decision:
    """Keep ``decision`` in :func:`recent_decisions` (and in the call plan being recorded)."""
    if decision.reasons:
        log.debug("mmkernels: %s", decision)
    _RECENT.append((next(_SEQUENCE), decision))
    recording = _RECORDING.top
    if recording is not None:
        recording.decisions.append(decision)
    return decision


_DECISIONS: dict[tuple, Decision] = {}


def clear_decision_cache() -> None:
    """Forget the cached backend decisions (after a test patches what they depend on), and
    the call plans made under them."""
    _DECISIONS.clear()
    clear_call_plans()


def _decide(op, kernel, caps, device, dtypes, extra, forced) -> Decision:
    reasons = list(extra)
    reasons += caps.not_supported_reasons(device, dtypes)
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
        return Decision(op, Backend.REFERENCE, tuple(reasons))
    return Decision(op, Backend.INTERPRETER if device.type == "cpu" else Backend.TRITON)


class _PoisonState(threading.local):
    on = False  # the class default: a plain attribute read on every thread


_POISON = _PoisonState()


@contextlib.contextmanager
def poison_outputs():
    """Within this block, outputs allocated by mmkernels' launchers start as NaN, so an
    element a kernel forgot to write shows (see :mod:`mmkernels.testing`)."""
    prev = _POISON.on
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
_NULL_CONTEXT = contextlib.nullcontext()  # reusable: it keeps no state


def device_guard(device: torch.device):
    """Context for launching kernels on ``device``; every op launches inside one.

    CUDA: Triton launches on the *current* CUDA device (and allocates there), not on its
    arguments' device, and the custom-op dispatcher sets no device guard; with a model
    spread over GPUs (``device_map="auto"``) an op's tensors may sit on ``cuda:1`` while
    ``cuda:0`` is current. Entered only then (``torch.cuda.device``).
    CPU under the interpreter: the interpreter's lock (see ``_INTERPRETER_LOCK``), so ops
    may be called from several threads. Otherwise it does nothing."""
    if device.type == "cpu":
        return _INTERPRETER_LOCK if _ENV["interpret"] else _NULL_CONTEXT
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return _NULL_CONTEXT
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
    the custom-op dispatch costs more host time than a whole call plan's replay
    (``docs/defaults.md``) and does nothing there. Anything that works at the
    dispatcher level (autograd, torch.compile, modes, transforms, the profiler) gets the
    registered op. Not used while ``torch.compile`` traces (the compiled graph calls the
    op without the wrapper).

    With ``op`` (the op's name), it also keeps the op's :class:`CallPlans`: a public op
    computes the call's :func:`plan_key`, asks :meth:`replay`, and only on a miss
    validates and calls :meth:`call` with the key, which records the call as a plan where
    it qualifies."""

    def __init__(self, op: str | None = None):
        self._local = threading.local()
        self.plans = CallPlans(op) if op is not None else None

    def replay(self, key, op_inputs: tuple):
        """The result of the call with ``op_inputs`` from the plan of ``key`` (its
        :func:`plan_key`), or :data:`MISS`."""
        plan = self.plans._plans.get(key) if key is not None else None
        if plan is None:
            return MISS
        self.plans.replays += 1
        return plan.run(op_inputs)

    def call(self, op, op_inputs: tuple, args, body=None, key=None):
        """``op(*op_inputs)`` with ``args`` (the wrapper's validation) handed over; or
        ``body(*op_inputs)``, the function ``op`` registers, where the dispatcher is not
        needed (recorded as the plan of ``key``, the call's :func:`plan_key`, if given)."""
        if torch.compiler.is_compiling():
            return op(*op_inputs)
        self._local.value = (op_inputs, args)
        try:
            if body is not None and key is not None:
                return self.plans.record(key, body, op_inputs)  # a key implies no dispatcher is needed
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


def _dispatcher_feature_active() -> bool:
    """A feature that works at the dispatcher level is on for this thread: ``torch.jit``
    tracing, a functorch transform, a dispatch or function mode, the autograd profiler.
    True where this torch lacks one of the checks (the safe answer)."""
    C = torch._C
    try:
        # torch.jit.is_tracing() is C._is_tracing() behind a Python wrapper.
        return bool(
            C._is_tracing()
            or C._are_functorch_transforms_active()
            or C._len_torch_dispatch_stack()
            or C._is_torch_function_mode_enabled()
            or C._autograd._profiler_enabled()
        )
    except AttributeError:
        return True


def dispatcher_needed(op_inputs) -> bool:
    """Whether a call with ``op_inputs`` must go through its registered custom op rather
    than straight to the op's body: autograd (a tensor requires grad), a dispatch or
    function mode (``FakeTensorMode``, ``FlopCounterMode``, ``with torch.device(...)``),
    a functorch transform (``vmap``, ``grad``), tensor subclasses and meta tensors, the
    autograd profiler (it records the op), ``torch.jit`` tracing. Unknown to this torch:
    needed."""
    if _dispatcher_feature_active():
        return True
    grad = torch._C.is_grad_enabled()
    first = None
    for value in op_inputs:
        if isinstance(value, torch.Tensor):
            tensors = (value,)
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
            tensors = value  # a list[Tensor] argument (anything else in it: not plain below)
        else:
            continue
        for t in tensors:
            if type(t) not in _PLAIN_TENSOR_TYPES or (grad and t.requires_grad):
                return True
            if first is None:
                first = t
    # The public ops reject inputs on different devices before this: the first tells.
    return first is not None and first.is_meta


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


# --------------------------------------------------------------------------------------
# The op scaffold: what every op has, made once from what each op states


# MMKERNELS_DEBUG_CHECKS, read at import (not per call); refresh_environment() reads it again.
_debug_checks = env_flag("MMKERNELS_DEBUG_CHECKS")


def resolve_check(check: bool | None, default: bool) -> bool:
    """The one meaning of an op's ``check`` argument. ``True``: read the values that the
    contract constrains but shapes cannot show (placeholder counts, ``cu_seqlens``
    offsets, key ranges, table ids) on the host, one sync, and raise ``ValueError``
    naming the argument on a violation. ``False``: no host sync; whatever those values
    are, nothing is read or written out of bounds and every output row is written (the
    op's docstring says with what). ``None``: the op's default (``default``: on where the
    framework it replaces checks by default, as Hugging Face's merge does), turned on for
    every op by the environment variable ``MMKERNELS_DEBUG_CHECKS=1``."""
    if check is None:
        return default or _debug_checks()
    if check is True or check is False:
        return check
    raise TypeError(f"check: expected a bool or None, got {type(check).__name__}")


@dataclass(frozen=True)
class Needs:
    """What a validated call asks of the backend choice: its device, the dtypes the kernel
    would compute with, reasons beyond the capabilities that it cannot take the call, and
    which of the op's capabilities apply (``variant``: quantized_linear's scheme; None
    for an op with one :class:`Capabilities`)."""

    device: torch.device
    dtypes: tuple
    reasons: tuple = ()
    variant: str | None = None


class Op:
    """The generic half of an op, made from what the op's file states.

    An op file states its contract and its own parts:

    * ``name`` and ``schema``: the registered op ``mmkernels::<name>`` and its signature
      (``torch.library`` schema syntax; ``Tensor(a!)`` for an argument it writes);
    * ``validate(*op_inputs)``: the registered op's inputs checked and turned into the
      op's arguments object (errors name the argument);
    * ``needs(args)``: a :class:`Needs` (device, dtypes, extra reasons, variant);
    * ``kernel`` and ``capabilities`` (one :class:`Capabilities`, or one per variant);
    * ``reference(args)`` and ``launch(args)``: the PyTorch reference and the Triton
      launcher on validated arguments, each returning the result (None for an op that
      only writes an argument);
    * ``fake(*op_inputs)``: the result's shape and dtype without computing it;
    * optionally ``setup_context`` / ``backward``, as ``register_autograd`` takes them;
    * optionally ``routes`` (:class:`mmkernels.routes.Route`: other Triton forms, the
      standard PyTorch path), ``bucket(args)``, the call's shape bucket, and
      ``reduction_length(args)``: a per-GPU table (:mod:`mmkernels.routes`, written by
      ``mmkernels tune``, or at a bucket's first call under ``MMKERNELS_AUTOTUNE=1``) may
      choose one of them for a bucket; without an entry the launcher runs (the route
      "heuristic"), or the route ``default_route(args)`` names for the call: where the
      op knows its launcher to be slower than one of its routes (quantized_linear's
      dequantize + cuBLAS from 2048 rows) until a table says otherwise.

    From these this makes the custom op with its fake and autograd registrations, the
    body the custom op runs (the public function's validation if it was handed over for
    these very inputs, else validation; the backend choice; the reference, or the
    launcher under :func:`device_guard`), and the call path of the public function:
    :meth:`replay` a call plan, else :meth:`call` with the validated arguments (the body
    straight away where no dispatcher feature is needed, else the registered op)."""

    def __init__(self, name: str, *, schema: str, validate: Callable, needs: Callable[[Any], Needs], kernel: Any,
                 capabilities, reference: Callable, launch: Callable, fake: Callable,
                 setup_context: Callable | None = None, backward: Callable | None = None, routes: tuple = (),
                 bucket: Callable[[Any], str] | None = None, reduction_length: Callable[[Any], int] | None = None,
                 decision_name: str | None = None, default_route: Callable[[Any], str | None] | None = None):  # fmt: skip
        if routes and (bucket is None or reduction_length is None):
            raise ValueError(f"{name}: an op with routes states its shape bucket and reduction length "
                             f"(bucket=, reduction_length=)")  # fmt: skip
        self.name = name
        # What backend decisions, route tables and force_route call the op: its name, or
        # the name of the op it is a form of (the merge's in-place op decides as the merge).
        self.decision_name = decision_name or name
        # The candidate routes (mmkernels.routes.Route) a table may choose for a call in
        # bucket(args); the launcher is the heuristic, taken when no table entry applies.
        # reduction_length(args): the length of the sums behind each output (K), which
        # scales the tolerance a route is checked with when it is tuned.
        self.routes = {route.name: route for route in routes}
        self.default_route = default_route
        self.bucket = bucket
        self.reduction_length = reduction_length
        self.validate = validate
        self.needs = needs
        self.kernel = kernel
        self.capabilities = capabilities
        self.reference = reference
        self.launch = launch
        self.handover = ValidatedHandOver(name)
        # Decision names per variant, made once ("quantized_linear[w8a16]").
        self._decision_names = (
            {variant: f"{self.decision_name}[{variant}]" for variant in capabilities}
            if isinstance(capabilities, dict) else None
        )
        mutates = tuple(re.findall(r"Tensor\(\w+!\)\s*(\w+)", schema))
        self._returns_nothing = schema.replace(" ", "").endswith("->()")  # an op that only writes an argument
        self.op = torch.library.custom_op(f"mmkernels::{name}", self.body, mutates_args=mutates, schema=schema)
        self.op.register_fake(fake)
        if backward is not None:
            self.op.register_autograd(backward, setup_context=setup_context)

    def body(self, *op_inputs):
        """What the registered op runs (and the public function, where no dispatcher is needed)."""
        args = self.handover.take(op_inputs) or self.validate(*op_inputs)
        out = self.run(args)
        return None if self._returns_nothing else out

    def run(self, args):
        """The result for validated ``args``: the backend choice, then the reference, or the
        launcher or the route a table (or :func:`mmkernels.routes.force_route`) chose."""
        needs = self.needs(args)
        if self._decision_names is None:
            name, caps = self.decision_name, self.capabilities
        else:
            name, caps = self._decision_names[needs.variant], self.capabilities[needs.variant]
        decision = decide_backend(name, self.kernel, caps, needs.device, needs.dtypes, needs.reasons)
        if decision.backend is Backend.REFERENCE:
            record_decision(decision)
            return self.reference(args)
        route = chosen = None
        if self.routes and (needs.device.type in _routes.TABLE_DEVICE_TYPES or _routes.routes_forced()):
            route, chosen = self._route(args, name, needs.device)
        if chosen is not None:
            decision = dataclasses.replace(decision, route=chosen[0], route_source=chosen[1])
        record_decision(decision)
        with device_guard(needs.device):
            return self.launch(args) if route is None else route.run(args)

    def _route(self, args, variant_op: str, device: torch.device):
        """(the route to run, None for the launcher; the (name, source) taken, or None for
        the heuristic) from :func:`mmkernels.routes.lookup`."""
        bucket = self.bucket(args)
        chosen = _routes.lookup(self.decision_name, variant_op, device, bucket)
        if chosen is None and _routes.autotune_enabled():
            # The timed runs are not this call's plan; what runs after them is.
            with _no_recording():
                chosen = _routes.autotune(self, args, variant_op, bucket, device)
        if chosen is None and self.default_route is not None:
            name = self.default_route(args)
            chosen = (name, "default") if name is not None else None
        if chosen is None or chosen[0] == _routes.HEURISTIC:
            return None, chosen
        name, source = chosen
        route = self.routes.get(name)
        why = f"no route {name!r} (routes: {[_routes.HEURISTIC, *self.routes]})" if route is None else route.reason_not(args)
        if why is None:
            return route, chosen
        if source == "forced":
            raise ValueError(f"force_route: {self.decision_name}: {why}")
        return None, None  # a table of another mmkernels version, or a call its route cannot take: the heuristic

    def replay(self, key, op_inputs: tuple):
        """The result of the call plan of ``key`` (a :func:`plan_key` of the call), or :data:`MISS`."""
        return self.handover.replay(key, op_inputs)

    def call(self, op_inputs: tuple, args, key=None):
        """The op on ``op_inputs`` with ``args``, the public function's validation of them,
        handed over (recorded as the call plan of ``key`` where the call qualifies)."""
        return self.handover.call(self.op, op_inputs, args, body=self.body, key=key)

    @property
    def plans(self) -> "CallPlans":
        return self.handover.plans


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host. ``triton.cdiv`` is a constexpr function: called from
    Python it goes through Triton's JIT call machinery, a cost per call that a launcher
    would pay several times (the host-overhead profile showed it)."""
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
    """How launchers allocate outputs and scratch: ``torch.empty``, or NaN under
    :func:`poison_outputs`. A call being recorded as a plan (see :class:`CallPlans`) notes
    the allocation, so the plan makes the same one on each replay."""
    if _POISON.on:
        # Integer scratch (counts) starts at the most negative value, just as visible.
        fill = float("nan") if dtype.is_floating_point else True if dtype is torch.bool else torch.iinfo(dtype).min
        out = torch.full(shape, fill, dtype=dtype, device=device)
    else:
        out = torch.empty(shape, dtype=dtype, device=device)
    recording = _RECORDING.top
    if recording is not None:
        recording.allocations.append((out, tuple(shape), dtype, device))
    return out


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
    """Add a case beyond the ops' own (:func:`mmkernels.ops.aot_cases` makes those when
    asked; nothing registers at import): for kernels outside mmkernels' ops."""
    if case.name in _AOT:
        raise ValueError(f"AOT case {case.name!r} is already registered")
    _AOT[case.name] = case
    return case


def registered_aot_cases() -> list[AotCase]:
    """The cases added with :func:`register_aot`."""
    return list(_AOT.values())


def aot_cases() -> list[AotCase]:
    """Every AOT case: the ops' (:func:`mmkernels.ops.aot_cases`) and any registered.
    Kept for callers of this name; the ops package is where the cases live."""
    import mmkernels.ops

    return mmkernels.ops.aot_cases()


# --------------------------------------------------------------------------------------
# Direct launches: bind once, launch through the compiled kernel
#
# ``kernel[grid](*args, **meta)`` runs Triton's ``JITFunction.run`` on every call: it binds
# every argument through a generated binder (one C call per argument), turns the
# specialization into a string key, looks the compiled kernel up, builds launch metadata
# and only then calls the compiled kernel's launcher. That is most of a small op's host
# time. :func:`launch` keeps, per kernel and per *specialization key*, what that path
# found (the compiled kernel's launcher, its function handle and packed metadata, the
# constexpr values that trail the positional arguments) and launches later calls with
# the same key straight through the launcher, with the same arguments in the same order
# as ``JITFunction.run`` passes them. Any miss, and anything this layer does not model
# (launch hooks of a profiler, pre-run hooks, an async compile, another driver), takes
# Triton's own path, which then compiles, caches and launches as usual.
#
# The key is at least as fine as Triton's own specialization, so two calls with one key
# always run the same binary Triton would choose (tests/test_launch.py checks this
# against Triton's binder over generated arguments):
#   * the argument types (positions of tensors, ints, floats, bools, None);
#   * per tensor: its dtype and whether its data pointer is a multiple of 16 bytes;
#   * per int: whether it is a multiple of 16, whether it equals 1 (Triton compiles 1 in
#     as a constant), and its width class (all within int32, or each one's class);
#   * the values of constexpr parameters passed positionally, of anything else that is
#     not a tensor or a number, and every keyword (constexprs, num_warps, num_stages);
#   * the current device (Triton keeps one cache per device);
#   * Triton's debug and instrumentation knobs (part of its compile options).
# Floats and bools are not specialized by Triton (fp32 / u1 whatever the value).
#
# Triton private API used here, and only here (checked by check_direct_launch_api() and
# its test on every supported Triton, 3.6 to 3.9): ``triton.runtime.driver._active``;
# ``JITFunction.params`` (``is_constexpr``), ``.device_caches`` (its binder),
# ``.pre_run_hooks`` and ``.run(*args, grid=, warmup=, **meta)`` returning the compiled
# kernel; ``CompiledKernel.run(gx, gy, gz, stream, function, packed_metadata,
# launch_metadata, enter_hook, exit_hook, *bound_args)``, ``.function``,
# ``.packed_metadata``; ``triton.knobs.runtime.launch_enter_hook`` / ``launch_exit_hook``
# (hook chains with ``.calls``), ``.debug``, ``triton.knobs.compilation.instrumentation_mode``.

_PLAIN_TYPES = {float: "float", bool: "bool", type(None): "None"}  # Triton: fp32 / u1 / constexpr None


def _key_function(kernel, types: tuple, number: int):
    """A function ``(args, device, meta) -> key`` for calls whose positional arguments have
    ``types``; it returns None when a call's types differ (then the caller finds the
    function for those types). Generated once per kernel and types tuple, like Triton's
    own binder, so a key costs a few attribute reads per argument and no loop."""
    params = kernel.params
    names = [f"a{i}" for i in range(len(types))]
    checks, parts = [], [str(number), "device"]
    for i, (name, t) in enumerate(zip(names, types)):
        if i < len(params) and params[i].is_constexpr:
            parts.append(name)  # a constexpr passed positionally: its value is compiled in
            checks.append(f"type({name}) is T{i}")
        elif issubclass(t, torch.Tensor):
            # dtype and 16-byte alignment; a non-tensor here fails the attribute reads
            parts += [f"{name}.dtype", f"{name}.data_ptr() & 15 == 0"]
        elif t is int:
            checks.append(f"type({name}) is int")
            parts += [f"{name} & 15 == 0", f"{name} == 1",
                      f"(-2147483648 <= {name} <= 2147483647 or ({name} < 9223372036854775808 and 2))"]  # fmt: skip
        elif t in _PLAIN_TYPES:
            checks.append(f"type({name}) is T{i}")
        else:
            parts.append(name)  # anything else: its value (unhashable ones miss to Triton's path)
            checks.append(f"type({name}) is T{i}")
    unpack = f"    {', '.join(names)}, = args\n" if names else "    if args: return None\n"
    guard = f"    if not ({' and '.join(checks)}): return None\n" if checks else ""
    src = f"def key(args, device, meta):\n{unpack}{guard}    return ({', '.join(parts)}, *meta.items())\n"
    namespace = {f"T{i}": t for i, t in enumerate(types)}
    exec(src, namespace)  # noqa: S102 - generated from parameter positions only
    return namespace["key"]


class DirectLaunchAPIError(RuntimeError):
    """The Triton private API the direct launch relies on is not what it was written for."""


def check_direct_launch_api(kernel=None) -> None:
    """Raise :class:`DirectLaunchAPIError`, naming the Triton version, when the private API
    :func:`launch` uses is missing or changed (on ``kernel``, a ``JITFunction``, if given)."""
    import inspect

    import triton

    problems = []
    try:
        from triton import knobs
        from triton.compiler.compiler import CompiledKernel
        from triton.runtime import driver as driver_config
        from triton.runtime.jit import JITFunction
    except ImportError as e:
        raise DirectLaunchAPIError(f"triton {triton.__version__}: {e}") from e
    if not hasattr(driver_config, "_active"):
        problems.append("triton.runtime.driver has no _active")
    for name in ("launch_enter_hook", "launch_exit_hook"):
        hook = getattr(knobs.runtime, name, None)
        if not hasattr(hook, "calls"):
            problems.append(f"triton.knobs.runtime.{name} is not a hook chain with .calls ({type(hook).__name__})")
    for owner, name in ((knobs.runtime, "debug"), (knobs.compilation, "instrumentation_mode")):
        if not hasattr(owner, name):
            problems.append(f"triton.knobs has no {name}")
    run_params = list(inspect.signature(JITFunction.run).parameters)
    if run_params[:2] != ["self", "args"] or "grid" not in run_params or "warmup" not in run_params:
        problems.append(f"JITFunction.run(self, *args, grid, warmup, **kwargs) is now {run_params}")
    if not isinstance(getattr(CompiledKernel, "run", None), property):
        problems.append("CompiledKernel.run is not the launcher property")
    if kernel is not None:
        for name in ("params", "device_caches", "pre_run_hooks"):
            if not hasattr(kernel, name):
                problems.append(f"JITFunction has no {name}")
        if hasattr(kernel, "params") and not all(hasattr(p, "is_constexpr") for p in kernel.params):
            problems.append("JITFunction.params have no is_constexpr")
    if problems:
        raise DirectLaunchAPIError(
            f"triton {triton.__version__}: the direct kernel launch in mmkernels.backend was written for "
            f"triton 3.6-3.9 and this one differs: {'; '.join(problems)}"
        )


_MAX_ENTRIES = 1024


class _KernelLauncher:
    """Direct launches of one ``JITFunction`` (see the section comment above)."""

    def __init__(self, kernel):
        from triton import knobs
        from triton.runtime import driver as driver_config

        self.kernel = kernel
        self._drivers = driver_config
        self._runtime = knobs.runtime
        self._compilation = knobs.compilation
        self._driver = None
        self._get_device = self._get_stream = None
        self._knobs = None
        self._key_functions: dict[tuple, Callable] = {}
        self._key = self._first_key  # the key function of the latest types seen
        self._cache: dict[tuple, tuple] = {}
        self.direct = 0  # launches that took the direct path (tests read these)
        self.missed = 0

    def _rebind(self, drv) -> None:
        # Another driver (a stand-in, a second backend): entries of the old one never apply.
        self._cache.clear()
        self._driver = drv
        self._get_device = drv.get_current_device
        self._get_stream = drv.get_current_stream

    def __call__(self, grid, args: tuple, meta: dict):
        drv = self._drivers._active
        if drv is not self._driver:
            if drv is None:  # nothing launched through Triton yet: its path creates the driver
                return self._jit(grid, args, meta)
            self._rebind(drv)
        rt = self._runtime
        enter, leave = rt.launch_enter_hook, rt.launch_exit_hook
        if enter.calls or leave.calls or self.kernel.pre_run_hooks:
            return self._jit(grid, args, meta)  # a profiler wants launch metadata: Triton's path
        knob_state = (rt.debug, self._compilation.instrumentation_mode)
        if knob_state != self._knobs:
            self._cache.clear()
            self._knobs = knob_state
        device = self._get_device()
        try:
            key, entry = self._lookup(args, device, meta)
        except (AttributeError, TypeError, ValueError):  # other types, unhashable: retype, else Triton's path
            try:
                key = self._retype(args)(args, device, meta)
                entry = self._cache.get(key)
            except (AttributeError, TypeError, ValueError):
                return self._jit(grid, args, meta)
        if entry is None:
            return self._miss(key, device, grid, args, meta)
        run, function, packed, tail = entry
        n = len(grid)
        stream = self._get_stream(device)
        self.direct += 1
        # Launch hooks and metadata: None, which the launcher reads as "no hook" (the chains
        # are empty here; with a hook Triton's path ran above).
        run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream, function, packed, None, None, None,
            *args, *tail)  # fmt: skip

    def _first_key(self, args, device, meta):
        return None

    def _lookup(self, args, device, meta):
        """(key, cache entry or None); raises AttributeError, TypeError or ValueError for
        arguments the latest key function cannot take (then retype, or Triton's path)."""
        key = self._key(args, device, meta)
        if key is None:
            key = self._retype(args)(args, device, meta)
        return key, self._cache.get(key)

    def find(self, args, meta):
        """(key, cache entry, device) of a launch just made with ``args`` and ``meta``, for
        a call plan; None where it has no entry (it took Triton's path for good)."""
        if self._driver is None or self._drivers._active is not self._driver:
            return None
        device = self._get_device()
        try:
            key, entry = self._lookup(args, device, meta)
        except (AttributeError, TypeError, ValueError):
            return None
        return None if entry is None else (key, entry, device)

    def replay(self, step, args: list):
        """The launch of a call plan's ``step`` with ``args``: its cache entry straight
        away while every condition :meth:`__call__` checks still holds (same driver, no
        hooks, same knobs, same current device, the entry still cached), else
        :meth:`__call__`."""
        rt = self._runtime
        if (
            self._drivers._active is not self._driver
            or rt.launch_enter_hook.calls
            or rt.launch_exit_hook.calls
            or self.kernel.pre_run_hooks
            or (rt.debug, self._compilation.instrumentation_mode) != self._knobs
            or self._cache.get(step.key) is not step.entry
        ):
            return self(step.grid, tuple(args), step.meta)
        device = self._get_device()
        if device != step.device:
            return self(step.grid, tuple(args), step.meta)
        run, function, packed, tail = step.entry
        grid = step.grid
        n = len(grid)
        self.direct += 1
        run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, self._get_stream(device), function, packed,
            None, None, None, *args, *tail)  # fmt: skip

    def _retype(self, args):
        types = tuple(map(type, args))
        function = self._key_functions.get(types)
        if function is None:
            function = _key_function(self.kernel, types, len(self._key_functions))
            self._key_functions[types] = function
        self._key = function
        return function

    def _jit(self, grid, args, meta):
        return self.kernel.run(*args, grid=grid, warmup=False, **meta)

    def _miss(self, key, device, grid, args, meta):
        self.missed += 1
        compiled = self._jit(grid, args, meta)
        if compiled is None or hasattr(compiled, "result"):
            return compiled  # a hook took over, or an async compile: nothing to keep
        # The constexprs (and defaults) that follow the positional arguments, in parameter
        # order, as Triton's binder passes them to the launcher. Direct launches need the
        # positional arguments to be exactly the leading parameters and everything after
        # them to be compile-time constants (so they are fixed by the key).
        binder = self.kernel.device_caches[device][4]
        bound, specialization, _ = binder(*args, **meta)
        names = list(bound)
        params = self.kernel.params
        if len(names) != len(params) or any(p.name != name for p, name in zip(params, names)):
            return compiled
        tail = []
        for i in range(len(args), len(names)):
            if not params[i].is_constexpr or specialization[i][0] != "constexpr":
                return compiled  # a runtime argument passed by keyword: always Triton's path
            tail.append(bound[names[i]])
        if len(self._cache) >= _MAX_ENTRIES:
            self._cache.clear()  # arguments keyed by value that never repeat: stay bounded
        self._cache[key] = (compiled.run, compiled.function, compiled.packed_metadata, tuple(tail))
        return compiled


class _PassThrough:
    """Launch of anything that is not a compiled-path ``JITFunction``: the interpreter's
    functions, autotuner or heuristics wrappers, test stand-ins. Called as Triton is."""

    __slots__ = ("kernel",)
    direct = missed = 0

    def __init__(self, kernel):
        self.kernel = kernel

    def __call__(self, grid, args, meta):
        return self.kernel[grid](*args, **meta)


_LAUNCHERS: dict[int, Any] = {}
_LAUNCHERS_LOCK = threading.Lock()
_API_WARNED = []


def direct_launch_enabled() -> bool:
    """False when ``MMKERNELS_DIRECT_LAUNCH=0``: every launch takes Triton's own path (to
    compare, or to rule the direct path out). Read when a kernel is first launched."""
    return os.environ.get("MMKERNELS_DIRECT_LAUNCH", "1").lower() not in ("0", "false", "no", "off")


def _launcher_for(kernel):
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:  # pragma: no cover - triton is a dependency
        return _PassThrough(kernel)
    if type(kernel) is not JITFunction or not direct_launch_enabled():
        return _PassThrough(kernel)
    try:
        check_direct_launch_api(kernel)
    except DirectLaunchAPIError as e:
        if not _API_WARNED:
            _API_WARNED.append(True)
            log.warning("mmkernels: %s; kernels launch through Triton's slower path", e)
        return _PassThrough(kernel)
    return _KernelLauncher(kernel)


def launch(kernel, grid, args: tuple, meta: dict):
    """``kernel[grid](*args, **meta)``, through the compiled kernel's launcher when this
    call's specialization key was seen before (see the section comment). ``args``: the
    positional arguments, ``meta``: the keywords (constexprs, ``num_warps``,
    ``num_stages``). Interpreted kernels and stand-ins are called as before."""
    entry = _LAUNCHERS.get(id(kernel))
    if entry is None or entry.kernel is not kernel:
        with _LAUNCHERS_LOCK:
            entry = _launcher_for(kernel)
            _LAUNCHERS[id(kernel)] = entry
    recording = _RECORDING.top
    if recording is not None:
        recording.steps.append(("launch", entry, grid, args, meta))
    return entry(grid, args, meta)


def launcher_stats(kernel) -> tuple[int, int]:
    """(direct launches, misses) of ``kernel`` so far (0, 0 for pass-through kernels)."""
    entry = _LAUNCHERS.get(id(kernel))
    if entry is None or entry.kernel is not kernel:
        return 0, 0
    return entry.direct, entry.missed


def reset_launchers() -> None:
    """Forget every direct-launch entry (the next launch of each kernel takes Triton's path)."""
    with _LAUNCHERS_LOCK:
        _LAUNCHERS.clear()
    clear_call_plans()


# --------------------------------------------------------------------------------------
# Call plans: a call seen before replays its launches
#
# Even with direct launches, an op's Python (validation, the backend decision, the tile
# config, building launch arguments, the launcher's specialization key) cost several
# times an allocation plus a launch (tools/host_overhead.py). All of it is a function of
# what a call's *plan key* holds: per tensor input its shape, strides (or that it is
# contiguous, which fixes every stride that can matter: PyTorch ignores only those of
# size-1 dims, whose index is always 0), dtype, device and whether its address is 16-byte
# aligned (everything an op or Triton reads from a tensor except the address itself;
# tensors in a list input: their addresses relative to the list's first), and the value
# and type of every other input. So the first plain eager call with a key runs as before
# and is recorded: the allocations it made through :func:`empty_output`, the launches it
# made through :func:`launch`, the torch work between them it declared with
# :func:`plan_step` (the merge's cumsum and count check), the tensors it made that are a
# function of the key (:func:`plan_constant`: the merge's segment table) and the
# decisions it logged. Later calls with that key skip straight to the same allocations,
# steps and launches with this call's tensors substituted in (and log the same decisions).
#
# A call becomes a plan only when it is certainly a function of its key:
#   * the op's launcher says its path is made of launches only (:func:`plan_ok`; paths
#     that copy inputs with torch ops, sync, read global flags or fall back to the
#     reference never call it, or call :func:`no_plan`);
#   * every tensor a launch receives is an input of the call, an allocation it made, or
#     a view of one starting at the same address with the same dtype (what the kernel
#     sees of a tensor is its address and dtype; strides travel as integers, fixed by
#     the key); a temporary made any other way (a copy, a pinned table, a TMA
#     descriptor) leaves the call unplanned; so does an address two inputs share;
#   * no dispatcher-level feature is active (the same conditions as
#     :func:`dispatcher_needed`: autograd recording, modes, transforms, the profiler,
#     tracing, tensor subclasses, meta tensors), nothing is being compiled or captured
#     into a CUDA graph (a graph must not read a plan's constants, which the plan may
#     drop), no backend is forced.
# Plans are forgotten with the backend decisions (:func:`clear_decision_cache`, hence
# :func:`refresh_environment`) and with the launchers (:func:`reset_launchers`).
# ``MMKERNELS_CALL_PLANS=0`` turns them off.

_PARAMETER = torch.nn.Parameter
_PLAN_SCALAR_TYPES = frozenset({int, float, bool})
MISS = object()  # CallPlans.replay: no plan for this call


class _RecordingState(threading.local):
    top = None  # the _Recording of the call being recorded on this thread


_RECORDING = _RecordingState()


class _Recording:
    __slots__ = ("steps", "allocations", "decisions", "constants", "plannable", "spoiled")

    def __init__(self):
        self.steps: list[tuple] = []  # ("launch", launcher, grid, args, meta) or ("torch", fn, tensors, result)
        self.allocations: list[tuple] = []  # (tensor, shape, dtype, device)
        self.decisions: list[Decision] = []
        self.constants: list[torch.Tensor] = []
        self.plannable = False
        self.spoiled = False


@contextlib.contextmanager
def _no_recording():
    """No call plan records what runs inside the block (a bucket's first call that tunes its routes)."""
    recording = _RECORDING.top
    _RECORDING.top = None
    try:
        yield
    finally:
        _RECORDING.top = recording


def plan_constant(*tensors: torch.Tensor) -> None:
    """Tensors made by the call being recorded whose contents are a function of its plan
    key: its plan keeps them and its launches read them again.
    (The merge's segment table: kinds, row counts, segment offsets relative to the first
    feature, all held by its key.)"""
    recording = _RECORDING.top
    if recording is not None:
        recording.constants.extend(tensors)


def plan_step(fn: Callable, *tensors: torch.Tensor):
    """``fn(*tensors)``: work of the call being recorded that is not a launch (a cumsum,
    a count check that syncs and raises); its plan calls ``fn`` again at this point with
    that call's tensors. ``fn`` may read nothing but its tensors and what the key holds."""
    result = fn(*tensors)
    recording = _RECORDING.top
    if recording is not None:
        recording.steps.append(("torch", fn, tensors, result))
    return result


def plan_ok() -> None:
    """An op's launcher states that the call being run is made of :func:`empty_output`
    allocations and :func:`launch` launches only, so it may become a plan."""
    recording = _RECORDING.top
    if recording is not None:
        recording.plannable = True


def no_plan() -> None:
    """The call being run depends on something its plan key does not hold (a global flag
    such as ``allow_tf32``): it never becomes a plan."""
    recording = _RECORDING.top
    if recording is not None:
        recording.spoiled = True


def matmul_tf32() -> bool:
    """``torch.backends.cuda.matmul.allow_tf32``, read for a launch. A plan key does not
    hold torch's global flags, so the call being recorded never becomes a plan
    (:func:`no_plan`): put it last in a condition, so it is read only where it matters."""
    no_plan()
    return torch.backends.cuda.matmul.allow_tf32


def cudnn_tf32() -> bool:
    """``torch.backends.cudnn.allow_tf32``, read for a launch (see :func:`matmul_tf32`)."""
    no_plan()
    return torch.backends.cudnn.allow_tf32


def _read_plans_flag() -> None:
    _PLANS_ON[0] = os.environ.get("MMKERNELS_CALL_PLANS", "1").lower() not in ("0", "false", "no", "off")


_PLANS_ON = [True]
_read_plans_flag()
_ENV_REFRESHERS.append(_read_plans_flag)


def call_plans_enabled() -> bool:
    """False when ``MMKERNELS_CALL_PLANS=0`` (read at import and by :func:`refresh_environment`)."""
    return _PLANS_ON[0]


def plan_key(op_inputs: tuple, extra: tuple = ()):
    """The plan key of a call with ``op_inputs`` (see the section comment), or None when
    the call must not use plans: a dispatcher-level feature is active, a tensor requires
    grad under grad mode or is a subclass or meta, something is being compiled, a backend
    is forced, an input has a type a key cannot hold. ``extra``: what the public function
    reads beyond ``op_inputs`` (fields of an argument object), made part of the key."""
    if torch.compiler.is_compiling():  # first: Dynamo folds it, and traces nothing below
        return None
    if _dispatcher_feature_active() or not _PLANS_ON[0] or _FORCED.value is not None or _routes.routes_forced():
        return None
    types = tuple(map(type, op_inputs))
    key_function = _PLAN_KEY_FUNCTIONS.get(types)
    if key_function is None:
        key_function = _plan_key_function(types)
    key = key_function(op_inputs, torch._C.is_grad_enabled())
    if key is None:
        return None
    device = key[-1]  # the first tensor's device (all must share it: a call mixing devices fails, so has no plan)
    if device is not None:
        # torch.device.type makes a new string on every read (0.4 us): the type of each
        # device seen is looked up instead.
        device_type = _DEVICE_TYPES.get(device)
        if device_type is None:
            device_type = _DEVICE_TYPES.setdefault(device, device.type)
        if device_type == "meta":
            return None  # the fake kernel, through the dispatcher
        if device_type == "cuda" and torch.cuda.is_current_stream_capturing():
            # A graph captured from a replay would read the plan's constants, which the
            # plan may drop; captured calls take the ordinary path (its memory is the graph's).
            return None
    return (key, extra) if extra else key


_DEVICE_TYPES: dict[torch.device, str] = {}


_PLAN_KEY_FUNCTIONS: dict[tuple, Callable] = {}
_PLAN_KEY_NUMBERS = itertools.count()  # next() is atomic: two threads never share a number
_PLAIN_TENSORS = (torch.Tensor, _PARAMETER)


def _sequence_key(values, grad: bool):
    """The key part of a list or tuple input (tensors described, scalars with their type),
    or None when it holds a tensor that requires grad or something a key cannot hold.
    Tensors in a list are described with their address relative to the list's first
    tensor (and that one's alignment): stricter than alignment alone, and what an op that
    addresses a list through one base pointer (the merge's segment table) depends on.
    A list of plain tensors takes :func:`_tensor_list_key` (the same facts, checked in C)."""
    if len(values) >= _GUARDED_LIST_LENGTH and _TENSOR_GUARDS is not None and type(values[0]) in _PLAIN_TENSORS:
        key = _tensor_list_key(values, grad)
        if key is not _NOT_A_TENSOR_LIST:
            return key
    parts = []
    base = None
    for x in values:
        tx = type(x)
        if tx is torch.Tensor or tx is _PARAMETER:
            if grad and x.requires_grad:
                return None
            address = x.data_ptr()
            if base is None:
                base = address
                parts.append(address & 15)
            parts.append((x.shape, x.is_contiguous() or x.stride(), x.dtype, x.device, address - base))
        elif tx in _PLAN_SCALAR_TYPES or tx is str or x is None:
            parts.append((tx, x))
        else:
            return None
    return tuple(parts)


# Tensors described in C. A tensor described in Python costs about 0.6 us (five attribute
# reads of 60-130 ns each, and a nested tuple to hash): 2.6 us of a patch embedding's key,
# and 1.5x the host cost of a 1-image merge for a 16-image one (a feature tensor each).
# So a call's tensors are described in two parts: what a guard cannot check is read in
# Python and goes into the *lookup* (the 16-byte alignment of each top-level tensor, the
# first one's shape, which of them are one tensor; for a list, each tensor's address
# relative to the first, read by one C-level map at 70 ns a tensor); everything else the
# Python description held (Python type, dtype, device, requires_grad, sizes and strides,
# exactly) is checked by a Dynamo ``TensorGuards``, torch's own C++ check of a tensor list
# (about 80 ns a tensor), made from the first call seen with that lookup. The key holds
# the number of the guard that passed: never reused, and each guard is kept under one
# lookup, so the number stands for the lookup too. Tensors passing none of the guards kept
# for their lookup get a new guard and number: a new key, so a new plan, as a new shape
# did. Without TensorGuards (no torch this project supports) the Python description runs.
try:
    from torch._C._dynamo.guards import TensorGuards as _TENSOR_GUARDS
except ImportError:  # pragma: no cover - every supported torch has it (tests/test_call_plans.py)
    _TENSOR_GUARDS = None

_NOT_A_TENSOR_LIST = object()
_TENSOR_DATA_PTR = torch._C.TensorBase.data_ptr
_GUARD_NUMBERS = itertools.count()  # next() is atomic: two threads never share a number
_GUARDED: dict[tuple, list[tuple]] = {}  # lookup -> [(guard, number, whether a tensor requires grad)]
_GUARDED_LIMIT = 4096  # lookups kept (cleared beyond: the plans of cleared numbers just miss)
_GUARDS_PER_LOOKUP = 8
# Shorter lists are described in Python: the guarded description's fixed cost (a dict
# lookup, the guard call) is about 1 us, the Python description's 0.6 us a tensor.
_GUARDED_LIST_LENGTH = 3


def _guard_number(lookup: tuple, tensors: tuple, grad: bool) -> int | None:
    """The number of the guard kept under ``lookup`` that ``tensors`` pass (a new guard if
    none does), or None: a tensor requires grad under grad mode, or one is of a subclass
    or given twice (a guard refuses a tensor twice; no plan could tell the two apart)."""
    guards = _GUARDED.get(lookup)
    if guards is not None:
        for guard, number, requires_grad in guards:
            if guard.check(*tensors):
                return None if grad and requires_grad else number
    for x in tensors:
        tx = type(x)
        if tx is not torch.Tensor and tx is not _PARAMETER:
            return None  # a subclass: never keyed
    if len(set(map(id, tensors))) != len(tensors):
        return None
    requires_grad = any(x.requires_grad for x in tensors)
    entry = (_TENSOR_GUARDS(*tensors, dynamic_dims_sizes=None, dynamic_dims_strides=None), next(_GUARD_NUMBERS),
             requires_grad)  # fmt: skip
    if guards is None:
        if len(_GUARDED) >= _GUARDED_LIMIT:
            _GUARDED.clear()
        guards = _GUARDED.setdefault(lookup, [])
    elif len(guards) >= _GUARDS_PER_LOOKUP:
        del guards[0]
    guards.append(entry)
    return None if grad and requires_grad else entry[1]


def _tensor_list_key(values, grad: bool):
    """The key part of a list of tensors (see the comment above): its guard's number, None
    where the list cannot be keyed, or ``_NOT_A_TENSOR_LIST`` when an item is not a
    tensor (the caller describes the list in Python)."""
    try:
        addresses = tuple(map(_TENSOR_DATA_PTR, values))
    except Exception:  # noqa: BLE001 - an int or None in the list, a tensor without storage
        return _NOT_A_TENSOR_LIST
    base = addresses[0]
    return _guard_number((base & 15, *map(base.__rsub__, addresses)), values, grad)  # address - base, in C


def _distinct(tensors: tuple) -> tuple:
    """``tensors`` without repeats (q is k is v), in order: what a guard can check."""
    return tuple({id(t): t for t in tensors}.values())


def _plan_key_function(types: tuple) -> Callable:
    """A function ``(op_inputs, grad) -> key or None`` for inputs of exactly ``types``,
    generated once per types tuple (straight-line attribute reads: a loop with a type
    test per input cost twice as much). The key starts with the types tuple's number, so
    equal values of other types (1, 1.0, True) never share a key, and ends with the first
    tensor's device (or None). Its tensors are described by a guard's number (see above)."""
    number = next(_PLAN_KEY_NUMBERS)
    names = [f"a{i}" for i in range(len(types))]
    parts, grads, sequences, first = [str(number)], [], [], None
    guarded = _TENSOR_GUARDS is not None
    supported = True
    for i, (name, t) in enumerate(zip(names, types)):
        if t in _PLAIN_TENSORS:
            grads.append(f"{name}.requires_grad")
            device = f"{name}.device"
            if first is None:
                first = name
                device = "device"
            if not guarded:
                parts.append(f"({name}.shape, {name}.is_contiguous() or {name}.stride(), {name}.dtype, {device}, "
                             f"{name}.data_ptr() & 15)")  # fmt: skip
        elif t is type(None):
            parts.append("None")
        elif t in _PLAN_SCALAR_TYPES or t is str:
            parts.append(name)
        elif t is list or t is tuple:
            parts.append(f"s{i}")  # computed (and checked for None) before the return
            sequences.append(i)
        else:
            supported = False
    if not supported:  # a subclass, another object: never keyed
        function = lambda op_inputs, grad: None  # noqa: E731
        _PLAN_KEY_FUNCTIONS[types] = function
        return function
    lines = ["def key(op_inputs, grad):"]
    lines.append(f"    {', '.join(names)}{',' if len(names) == 1 else ''} = op_inputs" if names else "    pass")
    tensors = [name for name, t in zip(names, types) if t in _PLAIN_TENSORS]
    same = "True"
    if len(tensors) > 1:
        # Which top-level tensor inputs are one tensor (q is k is v): True when none are,
        # else every pair's identity (straight-line comparisons, no call).
        pairs = [f"{a} is {b}" for i, a in enumerate(tensors) for b in tensors[i + 1 :]]
        same = f"len({{{', '.join(f'id({n})' for n in tensors)}}}) == {len(tensors)} or ({', '.join(pairs)},)"
    if guarded and tensors:
        together = f"({', '.join(tensors)},)"
        lookup = ", ".join([repr(str(number)), *(f"{n}.data_ptr() & 15" for n in tensors), f"{first}.shape", "same"])
        lines.append(f"    same = {same}")
        lines.append(f"    number = _guard_number(({lookup}), {together} if same is True else _distinct({together}), grad)")
        lines.append("    if number is None: return None")
        parts.insert(1, "number")
    else:
        if len(tensors) > 1:
            parts.append(same)
        if grads:
            lines.append(f"    if grad and ({' or '.join(grads)}): return None")
    for i in sequences:
        lines.append(f"    s{i} = _sequence_key(a{i}, grad)")
        lines.append(f"    if s{i} is None: return None")
    if first is not None:
        lines.append(f"    device = {first}.device")
    lines.append(f"    return ({', '.join(parts)}, {'device' if first is not None else 'None'})")
    namespace = {"_sequence_key": _sequence_key, "_guard_number": _guard_number, "_distinct": _distinct}
    exec("\n".join(lines), namespace)  # noqa: S102 - generated from the input types only
    function = namespace["key"]
    function.source = "\n".join(lines)  # for tests and debugging
    _PLAN_KEY_FUNCTIONS[types] = function
    return function


class _Step:
    """One recorded launch: its arguments with the call's tensors as slots."""

    __slots__ = ("launcher", "grid", "args", "meta", "slots", "key", "entry", "device")

    def __init__(self, launcher, grid, args, meta, slots, found):
        self.launcher, self.grid, self.args, self.meta, self.slots = launcher, grid, args, meta, slots
        self.key, self.entry, self.device = found if found is not None else (None, None, None)


class _TorchStep:
    __slots__ = ("fn", "slots", "result")

    def __init__(self, fn, slots, result):
        self.fn, self.slots, self.result = fn, slots, result  # result: the allocation slot it fills, or None


class _Plan:
    __slots__ = ("allocations", "steps", "decisions", "result", "device", "cuda_index")

    def __init__(self, allocations, steps, decisions, result, device):
        self.allocations, self.steps, self.decisions, self.result, self.device = (
            allocations, steps, decisions, result, device)  # fmt: skip
        self.cuda_index = device.index if device.type == "cuda" and device.index is not None else None

    def run(self, op_inputs: tuple):
        if _POISON.on:
            allocs = [empty_output(a[0], a[1], a[2]) if a is not None else None for a in self.allocations]
        else:  # empty_output's common case, without its calls
            empty = torch.empty
            allocs = [empty(a[0], dtype=a[1], device=a[2]) if a is not None else None for a in self.allocations]
        # device_guard's choice, with what cannot change for this plan decided once.
        if self.cuda_index is not None:
            guard = _NULL_CONTEXT if self.cuda_index == torch.cuda.current_device() else device_guard(self.device)
        else:
            guard = device_guard(self.device)
        with guard:
            for step in self.steps:
                if type(step) is _TorchStep:
                    out = step.fn(*[(op_inputs[i] if j < 0 else op_inputs[i][j]) if i >= 0 else allocs[-1 - i]
                                    for i, j in step.slots])  # fmt: skip
                    if step.result is not None:
                        allocs[step.result] = out
                    continue
                args = list(step.args)
                for position, i, j in step.slots:
                    # i >= 0: input i (j >= 0: item j of that list input); i < 0: allocation -1 - i
                    args[position] = (op_inputs[i] if j < 0 else op_inputs[i][j]) if i >= 0 else allocs[-1 - i]
                if step.entry is not None:
                    step.launcher.replay(step, args)
                else:
                    step.launcher(step.grid, tuple(args), step.meta)
        recent = _RECENT.append
        for decision in self.decisions:
            recent((next(_SEQUENCE), decision))
        result = self.result
        if result is None:
            return None
        i, j, view = result
        out = (op_inputs[i] if j < 0 else op_inputs[i][j]) if i >= 0 else allocs[-1 - i]
        return out if view is None else out.as_strided(*view)


_PLAN_CACHES: list["CallPlans"] = []


class CallPlans:
    """The plans of one op (see the section comment above), keyed by :func:`plan_key`."""

    def __init__(self, op: str, max_entries: int = 256):
        self.op = op
        self.max_entries = max_entries
        self._plans: dict[tuple, _Plan] = {}
        self.replays = 0  # tests read these
        self.recorded = 0
        _PLAN_CACHES.append(self)

    def __len__(self) -> int:
        return len(self._plans)

    def clear(self) -> None:
        self._plans.clear()

    def record(self, key, body, op_inputs: tuple):
        """``body(*op_inputs)``, recorded; the recording becomes the plan of ``key`` if it
        qualifies (see the section comment)."""
        outer = _RECORDING.top
        recording = _RECORDING.top = _Recording()
        try:
            result = body(*op_inputs)
        finally:
            _RECORDING.top = outer
        if outer is not None:
            outer.spoiled = True  # an op inside another op's call: not modelled
        if recording.plannable and not recording.spoiled:
            plan = _make_plan(recording, op_inputs, result)
            if plan is not None:
                if len(self._plans) >= self.max_entries:
                    self._plans.clear()  # keys that never repeat (new shapes each call): stay bounded
                self._plans[key] = plan
                self.recorded += 1
        return result


def _make_plan(recording: _Recording, op_inputs: tuple, result) -> _Plan | None:
    """The plan of a recorded call, or None where a launch receives a tensor that is not
    an input, an allocation, or a same-address same-dtype view of one."""
    by_id: dict[int, tuple[int, int] | None] = {}
    by_address: dict[tuple, tuple[int, int] | None] = {}
    device = None

    def note(t, slot):
        nonlocal device
        device = device or t.device
        key = id(t)
        if key not in by_id:
            by_id[key] = slot
        elif by_id[key] is None or by_id[key][1] >= 0 or slot[1] >= 0:
            # One tensor at two places, one of them in a list: which one a later call's
            # launch should read is unknowable. (One tensor as two top-level inputs, q is
            # k, is fine: the key holds which top-level inputs are one tensor.)
            by_id[key] = None
        if t.numel():
            address = (t.data_ptr(), t.dtype)
            if address not in by_address:
                by_address[address] = by_id[key]
            elif by_address[address] != by_id[key]:
                by_address[address] = None  # two tensors at one address: a view's origin is unknowable

    for i, v in enumerate(op_inputs):
        if isinstance(v, torch.Tensor):
            note(v, (i, -1))
        elif isinstance(v, (list, tuple)):
            for j, x in enumerate(v):
                if isinstance(x, torch.Tensor):
                    note(x, (i, j))
    for n, (t, _, _, _) in enumerate(recording.allocations):
        note(t, (-1 - n, -1))
    allocations = [(shape, dtype, dev) for _, shape, dtype, dev in recording.allocations]
    constants = {id(t) for t in recording.constants}
    constant_addresses = {(t.data_ptr(), t.dtype) for t in recording.constants if t.numel()}

    def slot_of(t):
        slot = by_id.get(id(t))
        if slot is None and t.numel():
            slot = by_address.get((t.data_ptr(), t.dtype))
        return slot

    steps = []
    for kind, *recorded in recording.steps:
        if kind == "torch":  # plan_step(fn, *tensors) -> out
            fn, tensors, out = recorded
            slots = [slot_of(t) for t in tensors]
            if any(slot is None for slot in slots):
                return None
            filled = None
            if isinstance(out, torch.Tensor):
                filled = len(allocations)
                allocations.append(None)
                note(out, (-1 - filled, -1))
            steps.append(_TorchStep(fn, tuple(slots), filled))
            continue
        launcher, grid, args, meta = recorded
        slots = []
        for position, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                if id(a) in constants or (a.numel() and (a.data_ptr(), a.dtype) in constant_addresses):
                    continue  # kept by the plan as it is
                slot = slot_of(a)
                if slot is None:
                    return None
                slots.append((position, *slot))
            elif not (a is None or type(a) in _PLAN_SCALAR_TYPES or type(a) is str):
                return None  # a descriptor or another object made for this call
        found = launcher.find(args, meta) if hasattr(launcher, "find") else None
        template = list(args)
        for position, _, _ in slots:
            template[position] = None  # the plan must not keep the recorded call's tensors alive
        steps.append(_Step(launcher, grid, tuple(template), meta, tuple(slots), found))
    planned_result = None
    if result is not None:
        if not isinstance(result, torch.Tensor):
            return None
        slot = by_id.get(id(result))
        view = None
        if slot is None:
            slot = slot_of(result)
            if slot is None:
                return None
            view = (tuple(result.shape), result.stride())
            if slot[0] < 0 and allocations[-1 - slot[0]] is not None:  # an allocation, not a plan_step's result
                alloc = recording.allocations[-1 - slot[0]][0]
                if alloc.is_contiguous() and result.is_contiguous() and alloc.numel() == result.numel():
                    # A reshape of an allocation: allocate it in the result's shape (the
                    # kernels see only its address) and return it as it is.
                    allocations[-1 - slot[0]] = (tuple(result.shape), alloc.dtype, alloc.device)
                    view = None
        planned_result = (*slot, view)
    allocations = tuple(allocations)
    return _Plan(allocations, tuple(steps), tuple(recording.decisions), planned_result,
                 device if device is not None else torch.device("cpu"))  # fmt: skip


def clear_call_plans() -> None:
    """Forget every op's plans (the next call of each key runs and records again)."""
    for plans in _PLAN_CACHES:
        plans.clear()
