"""Validation harness shared by the tests, the demo and the GPU suite.

* :func:`relative_error` / :func:`assert_close`: ``||out - ref|| / ||ref||`` against a
  float64 reference, with a tolerance per dtype (:data:`RTOL`), optionally scaled by the
  reduction length (errors of a sum grow like its square root).
* :func:`poison_outputs`: a scoped override under which every output an mmkernels op
  allocates starts as NaN, so an element the kernel forgot to write shows.
* :func:`nan_padded`: a copy of a tensor placed inside a NaN-filled buffer (rows before
  and after, columns past the end of each row) so an out-of-bounds read shows as NaN.
* :func:`assert_bitwise_equal` / :func:`assert_deterministic`: bit-identical results
  (NaN payloads included), and a second run identical to the first.
* :class:`HostSyncCounter`: counts the operations that make the host wait for the device
  (``aten._local_scalar_dense`` behind ``.item()`` / ``bool(t)``, ``aten.nonzero``,
  ``aten.masked_select``, boolean indexing, ``.tolist()``, ...) during a block of code.
  It works on CPU, where nothing actually waits, so CI can count syncs without a GPU.
* :func:`kernels_replaced`: every op module's ``@triton.jit`` kernels swapped for stand-ins
  within a block (the host-overhead tool's launch counter, the GPU probe's capture).
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import math
import warnings
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from mmkernels.backend import empty_output, poison_outputs
from mmkernels.ops import OP_MODULES  # the one table of op modules

__all__ = [
    "RTOL",
    "HostSyncCounter",
    "assert_bitwise_equal",
    "assert_close",
    "assert_deterministic",
    "kernels_replaced",
    "empty_output",
    "nan_padded",
    "poison_outputs",
    "relative_error",
    "tolerance",
]

# Relative-error tolerance per output dtype for a computation with O(1) reduction length:
# a few ulps of the dtype (bf16 has 8 mantissa bits: ulp 2^-8 = 3.9e-3).
RTOL = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def tolerance(dtype: torch.dtype, reduction_length: int = 1) -> float:
    """Tolerance for outputs of ``dtype``; grows with sqrt(reduction_length)."""
    if dtype not in RTOL:
        raise ValueError(f"dtype: no tolerance defined for {dtype} (known: {sorted(map(str, RTOL))})")
    return RTOL[dtype] * math.sqrt(max(reduction_length, 1))


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref||_2 / ||ref||_2`` computed in float64 (0 when both are zero).

    NaN or inf anywhere in ``out`` where ``ref`` is finite gives ``inf``.
    """
    if out.shape != ref.shape:
        raise ValueError(f"out: expected shape {tuple(ref.shape)} (that of ref), got {tuple(out.shape)}")
    o, r = out.detach().to("cpu", torch.float64), ref.detach().to("cpu", torch.float64)
    finite = torch.isfinite(r)
    if not torch.equal(torch.isfinite(o) | ~finite, torch.ones_like(finite)):
        return math.inf
    diff = torch.linalg.vector_norm((o - r)[finite])
    norm = torch.linalg.vector_norm(r[finite])
    if norm == 0:
        return 0.0 if diff == 0 else math.inf
    return float(diff / norm)


def assert_close(out: torch.Tensor, ref: torch.Tensor, *, dtype: torch.dtype | None = None, reduction_length: int = 1,
                 name: str = "output") -> float:  # fmt: skip
    """Assert ``relative_error(out, ref) <= tolerance(dtype or out.dtype, reduction_length)``."""
    tol = tolerance(dtype or out.dtype, reduction_length)
    err = relative_error(out, ref)
    if not err <= tol:
        raise AssertionError(f"{name}: relative error {err:.3e} > tolerance {tol:.3e} ({dtype or out.dtype})")
    return err


def _bits(t: torch.Tensor) -> torch.Tensor:
    int_type = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.detach().contiguous().view(int_type)


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor, name: str = "output") -> None:
    """Same shape, dtype and bits (so NaN == NaN and -0.0 != 0.0)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        raise AssertionError(f"{name}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}")
    ba, bb = _bits(a).cpu(), _bits(b).cpu()
    if not torch.equal(ba, bb):
        n = int((ba != bb).sum())
        raise AssertionError(f"{name}: {n} of {ba.numel()} elements differ bitwise")


def assert_deterministic(fn: Callable[[], torch.Tensor], name: str = "output") -> torch.Tensor:
    """Run ``fn`` twice and demand bit-identical results; returns the first."""
    first = fn()
    second = fn()
    assert_bitwise_equal(first, second, name=f"{name} (second run)")
    return first


# --------------------------------------------------------------------------------------
# Poisoned outputs and NaN padding

def nan_padded(t: torch.Tensor, *, rows_before: int = 3, rows_after: int = 5, extra_cols: int = 7) -> torch.Tensor:
    """A view equal to ``t`` (2-D or more; the last dim is the row) that lives inside a
    NaN-filled buffer: NaN rows before and after it along dim 0 and NaN columns past the
    end of each row, so reads outside ``t`` return NaN. The view's row stride is
    ``t.shape[-1] + extra_cols`` (not contiguous on purpose)."""
    if t.dim() < 1:
        raise ValueError("t: expected at least 1 dim, got a scalar")
    rows = t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(-1, 1)
    n, d = rows.shape
    fill = float("nan") if t.is_floating_point() else -(2**30)
    buf = torch.full((rows_before + n + rows_after, d + extra_cols), fill, dtype=t.dtype, device=t.device)
    view = buf[rows_before : rows_before + n, :d]
    view.copy_(rows)
    if t.dim() == 1:
        return view[:, 0]
    return view.view(*t.shape[:-1], d) if t.dim() == 2 else view.unflatten(0, t.shape[:-1])


# --------------------------------------------------------------------------------------
# Host-sync counter

# aten ops whose result the host must wait for (data-dependent output or a Python value).
SYNC_OPS = frozenset(
    {
        "aten._local_scalar_dense",
        "aten.nonzero",
        "aten.nonzero_static",
        "aten.masked_select",
        "aten.unique",
        "aten._unique",
        "aten._unique2",
        "aten.unique_consecutive",
        "aten.unique_dim",
        "aten.equal",
        "aten.repeat_interleave",
    }
)
# Python-level conversions that read tensor data without passing through the dispatcher
# on CPU (on CUDA they copy to the host first).
SYNC_METHODS = {torch.Tensor.tolist: "Tensor.tolist", torch.Tensor.numpy: "Tensor.numpy"}




@contextlib.contextmanager
def kernels_replaced(stand_in: Callable[[str, Any], Any]) -> Iterator[None]:
    """Within the block, each ``*_kernel`` of every op module's kernels module is
    ``stand_in(name, kernel)`` (an object indexed by the grid, as a ``@triton.jit``
    function is); the kernels are restored afterwards, also on error."""
    saved = []
    try:
        for name in OP_MODULES:
            kernels = importlib.import_module(f"mmkernels.ops.{name}").kernels
            for attr in dir(kernels):
                if attr.endswith("_kernel"):
                    kernel = getattr(kernels, attr)
                    saved.append((kernels, attr, kernel))
                    setattr(kernels, attr, stand_in(attr, kernel))
        yield
    finally:
        for owner, attr, kernel in reversed(saved):
            setattr(owner, attr, kernel)


def _custom_op_def(func):
    if not isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return None
    if func.namespace in ("aten", "prim", "prims"):
        return None
    try:
        from torch._library.custom_ops import _maybe_get_opdef
    except ImportError:  # pragma: no cover - private API; without it custom ops count as opaque
        return None
    return _maybe_get_opdef(func._name if hasattr(func, "_name") else func)


class _SyncDispatchMode(TorchDispatchMode):
    def __init__(self, counter: "HostSyncCounter"):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = f"{func.namespace}.{func._overloadpacket.__name__}"
        if self.counter._inside_method == 0:
            if name in SYNC_OPS and not (name == "aten.repeat_interleave" and kwargs.get("output_size") is not None):
                self.counter._record(name)
            elif name in ("aten.index", "aten.index_put", "aten.index_put_") and _has_bool_index(args):
                self.counter._record(f"{name} (boolean mask)")
            elif name in ("aten._to_copy", "aten.copy_") and _is_device_to_host(func, args, kwargs):
                self.counter._record(f"{name} (device to host)")
        return func(*args, **kwargs)


class _SyncFunctionMode(TorchFunctionMode):
    def __init__(self, counter: "HostSyncCounter"):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        label = SYNC_METHODS.get(func)
        if label is None:
            opdef = _custom_op_def(func)
            if opdef is not None:
                # A torch.library.custom_op (ours included) runs Python inside: run its
                # body directly, outside this handler, so both modes see what it does.
                # (Autograd of the op is not recorded inside a HostSyncCounter block.)
                with self:
                    return opdef._init_fn(*args, **kwargs)
            return func(*args, **kwargs)
        self.counter._record(label)
        self.counter._inside_method += 1
        try:
            return func(*args, **kwargs)
        finally:
            self.counter._inside_method -= 1


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (indices or ()))


def _is_device_to_host(func, args, kwargs) -> bool:
    src = args[1] if func._overloadpacket.__name__ == "copy_" else args[0]
    dst_device = args[0].device if func._overloadpacket.__name__ == "copy_" else kwargs.get("device")
    return (
        isinstance(src, torch.Tensor)
        and src.device.type != "cpu"
        and dst_device is not None
        and torch.device(dst_device).type == "cpu"
    )


class HostSyncCounter:
    """Count host syncs in a block: ``with HostSyncCounter() as c: ...``; then ``c.count``
    (total) and ``c.ops`` (a Counter by op name).

    Works on CPU tensors (nothing waits there, but the same calls would wait on a GPU),
    so CI can show that a patched forward has fewer syncs. Counts the aten ops in
    :data:`SYNC_OPS`, boolean-mask indexing, device-to-host copies, and ``.tolist()`` /
    ``.numpy()``.
    """

    def __init__(self):
        self.ops: collections.Counter[str] = collections.Counter()
        self._inside_method = 0
        self._modes: list = []

    @property
    def count(self) -> int:
        return sum(self.ops.values())

    def _record(self, name: str) -> None:
        self.ops[name] += 1

    def __enter__(self):
        self._modes = [_SyncFunctionMode(self), _SyncDispatchMode(self)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self._modes = []
        return False

    def __repr__(self) -> str:
        return f"HostSyncCounter(count={self.count}, ops={dict(self.ops)})"


# --------------------------------------------------------------------------------------
# A stand-in GPU for Triton's compiled launch path


class StandInLaunches:
    """What :func:`stand_in_gpu` saw: ``compiles`` (kernel names, in order) and ``launches``
    (kernel name -> count, counted at the C launch every path ends in); ``last`` holds the
    arguments of the latest launch (grid, stream, function, kernel args)."""

    def __init__(self):
        self.compiles: list[str] = []
        self.launches: collections.Counter[str] = collections.Counter()
        self.last = None


@contextlib.contextmanager
def stand_in_gpu(cc: int = 90) -> Iterator[StandInLaunches]:
    """Within the block Triton's active driver claims to be a CUDA GPU of compute
    capability ``cc`` and every ``JITFunction`` launch runs Triton's real Python path
    (binder, cache key, ``CompiledKernel.launch_metadata``, the launcher object) with two
    parts stubbed: compilation (a ``CompiledKernel`` with no binary, made at once) and the
    C launch (counted). CPU tensors stand for device tensors. Kernels must be real
    ``JITFunction`` objects (not the interpreter's). What was compiled inside is dropped
    afterwards, and the previous driver is put back."""
    import gc
    from collections import namedtuple

    import triton.compiler as triton_compiler
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime import driver as driver_config

    from mmkernels import backend

    seen = StandInLaunches()
    device_id = 7000 + cc  # the JIT keeps one cache per device id: one of our own

    def c_launch(*args):  # the arguments of the C launch (triton.runtime.driver.active.utils.launch)
        function, kernel_args = args[4], args[-1]
        seen.launches[function] += 1
        seen.last = (args[:3], args[3], function, tuple(kernel_args))

    class Utils:
        launch = staticmethod(c_launch)

        @staticmethod
        def load_binary(name, kernel, shared, device):
            return 0, name, 0, 0, 1024  # module, function (the kernel's name), regs, spills, max threads

        @staticmethod
        def unload_module(module):
            pass

        @staticmethod
        def get_device_properties(device):
            return {"max_shared_mem": 228 * 1024, "multiprocessor_count": 132}

    class StubLauncher:
        """Stands in for the NVIDIA launcher object (whose argument annotations come from
        a C module built against the CUDA driver): the same Python work per launch as
        triton 3.8's ``CudaLauncher.__call__`` (scratch checks, then the C launch)."""

        def __init__(self, src, metadata):
            self.num_ctas = getattr(metadata, "num_ctas", 1)
            self.global_scratch_size = metadata.global_scratch_size
            self.profile_scratch_size = metadata.profile_scratch_size
            self.launch_cooperative_grid = metadata.launch_cooperative_grid
            self.launch_pdl = metadata.launch_pdl

        def __call__(self, gx, gy, gz, stream, function, packed, launch_metadata, enter, leave, *args):
            def allocate_scratch(size):
                return None if size <= 0 else gx * gy * gz * self.num_ctas * size

            global_scratch = allocate_scratch(self.global_scratch_size)
            profile_scratch = allocate_scratch(self.profile_scratch_size)
            c_launch(gx, gy, gz, stream, function, self.launch_cooperative_grid, self.launch_pdl, packed,
                     launch_metadata, enter, leave, global_scratch, profile_scratch, None, None, args)  # fmt: skip

    class StandInDriver(DriverBase):
        utils = Utils()
        launcher_cls = StubLauncher

        @classmethod
        def is_active(cls):
            return True

        def get_current_target(self):
            return GPUTarget("cuda", cc, 32)

        def get_current_device(self):
            return device_id

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def map_python_to_cpp_type(self, ty):
            raise NotImplementedError

        def get_benchmarker(self):
            raise NotImplementedError

    for name in sorted(getattr(StandInDriver, "__abstractmethods__", ())):
        setattr(StandInDriver, name, lambda self, *a, **k: None)
    StandInDriver.__abstractmethods__ = frozenset()

    fields = ("name", "num_warps", "num_ctas", "shared", "global_scratch_size", "global_scratch_align",
              "profile_scratch_size", "profile_scratch_align", "launch_cooperative_grid", "launch_pdl",
              "tensordesc_meta", "instrumentation_mode", "tmem_size", "target", "warp_size")  # fmt: skip
    Metadata = namedtuple("Metadata", fields)

    class StubCompiled(CompiledKernel):
        def __init__(self, src, target=None, options=None, **kwargs):
            options = options or {}
            name = src.fn.__name__ if hasattr(src, "fn") else str(src)
            self.src, self.hash, self.name = src, name, name
            self.metadata = Metadata(name, options.get("num_warps", 4), options.get("num_ctas", 1), 0, 0, 1, 0, 1,
                                     False, False, None, "", None, target, 32)  # fmt: skip
            self.packed_metadata = (self.metadata.num_warps, self.metadata.num_ctas, 0)
            self.asm, self.kernel, self.metadata_group = {}, b"", {}
            self.module = self.function = self._run = None
            seen.compiles.append(name)

        def __del__(self):  # nothing was loaded
            pass

    real_compile = triton_compiler.compile
    previous = getattr(driver_config, "_active", None)
    driver_config.set_active(StandInDriver())
    triton_compiler.compile = StubCompiled
    backend.reset_launchers()
    touched = []
    try:
        yield seen
    finally:
        triton_compiler.compile = real_compile
        driver_config.set_active(previous)
        backend.reset_launchers()
        # JITFunction.create_binder kept the stub as each kernel's compile: put the real one
        # back and drop what was "compiled" for the stand-in device.
        from triton.runtime.jit import JITFunction

        with warnings.catch_warnings():  # isinstance on every object wakes deprecated torch aliases
            warnings.simplefilter("ignore")
            objects = gc.get_objects()
        for obj in objects:
            if type(obj) is JITFunction and getattr(obj, "compile", None) is StubCompiled:
                touched.append(obj)
        for kernel in touched:
            kernel.compile = real_compile
            kernel.device_caches.pop(device_id, None)
