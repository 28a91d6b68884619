"""The direct launch layer (``mmkernels.backend.launch``) against Triton's own launch path.

No GPU here: ``mmkernels.testing.stand_in_gpu`` makes Triton's active driver a stand-in
sm_90 GPU with compilation and the C launch stubbed, so ``JITFunction.run`` (binder,
specialization, cache) runs for real and each launch's arguments are recorded. The GPU
twin (tests/test_launch_gpu.py) runs the compiled kernels."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import triton
from triton.runtime.jit import JITFunction

import launch_kernels
from mmkernels import backend
from mmkernels.ops import _varlen_attention_kernels
from mmkernels.testing import stand_in_gpu

SCALE_ROWS = JITFunction(launch_kernels.scale_rows)
POSITIONAL_CONSTEXPR = JITFunction(launch_kernels.positional_constexpr)


def test_direct_launch_api_of_this_triton():
    """Fails, naming the Triton version, when a private API the direct launch reads changed
    (the runtime would then log a warning and take Triton's slower path)."""
    try:
        backend.check_direct_launch_api(SCALE_ROWS)
    except backend.DirectLaunchAPIError as e:
        pytest.fail(str(e))
    x = _tensor(torch.float32)
    with stand_in_gpu():
        compiled = SCALE_ROWS.run(x, x, x, 64, 1, 0.5, True, grid=(1,), warmup=False, BLOCK=16)
        entry = SCALE_ROWS.device_caches[triton.runtime.driver.active.get_current_device()]
    version = f"triton {triton.__version__}"
    assert len(entry) == 5 and callable(entry[4]), f"{version}: device_caches entries changed"
    bound, specialization, _ = entry[4](x, x, x, 64, 1, 0.5, True, BLOCK=16)
    assert list(bound) == [p.name for p in SCALE_ROWS.params], f"{version}: the binder's bound arguments changed"
    assert specialization[4] == ("constexpr", 1) and specialization[7][0] == "constexpr", f"{version}: {specialization}"
    for name in ("function", "packed_metadata"):
        assert hasattr(compiled, name), f"{version}: CompiledKernel has no {name}"


def test_api_error_names_the_version(monkeypatch):
    from triton.compiler.compiler import CompiledKernel

    monkeypatch.setattr(CompiledKernel, "run", None)
    with pytest.raises(backend.DirectLaunchAPIError, match=f"triton {triton.__version__}"):
        backend.check_direct_launch_api()


def _tensor(dtype, misaligned=False, n=64):
    t = torch.zeros(n + 8, dtype=dtype)
    return t[1 : n + 1] if misaligned else t[:n]


INTS = [0, 1, 2, 15, 16, 17, 32, -1, -16, 2**31 - 1, 2**31, 2**32, 2**63 - 16, 2**63]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int32]


def _random_args(rng):
    x = _tensor(rng.choice(DTYPES), rng.random() < 0.3)
    y = None if rng.random() < 0.1 else _tensor(rng.choice(DTYPES), rng.random() < 0.3)
    scale = rng.choice([0.5, 1.0, 2]) if rng.random() < 0.9 else True  # an int or bool where a float usually is
    flag = rng.choice([True, False, 1, 0])
    args = (x, y, _tensor(torch.float32), rng.choice(INTS), rng.choice(INTS), scale, flag)
    meta = dict(BLOCK=rng.choice([16, 32]), num_warps=rng.choice([4, 8]))
    if rng.random() < 0.2:
        meta["EVEN"] = False
    return args, meta


def test_key_is_at_least_as_fine_as_tritons_specialization():
    """Two calls with one direct-launch key always have one Triton specialization (so they
    run the binary Triton would pick), over generated arguments: dtypes, 16-byte alignment,
    ints equal to 1, multiples of 16, int32 / int64 / uint64 widths, None, bools and ints
    where floats usually are, constexprs and launch options."""
    rng = random.Random(0)
    with stand_in_gpu():
        launcher = backend._launcher_for(SCALE_ROWS)
        device = triton.runtime.driver.active.get_current_device()
        SCALE_ROWS.run(*_random_args(rng)[0], grid=(1,), warmup=True, BLOCK=16)  # creates the binder
        binder = SCALE_ROWS.device_caches[device][4]
        seen: dict = {}
        distinct = set()
        for _ in range(3000):
            args, meta = _random_args(rng)
            ours = launcher._retype(args)(args, device, meta)
            _, specialization, options = binder(*args, **meta)
            theirs = (str(specialization), str(options))
            assert seen.setdefault(ours, theirs) == theirs, (args, meta)
            distinct.add(theirs)
        # Not vacuous: the generated calls cover many specializations, each under few keys.
        assert len(distinct) > 300
        assert len(seen) < 3 * len(distinct)


def _jit_then_direct(calls):
    """Launch every (grid, args, meta) first through Triton's path and then through
    ``backend.launch`` twice; returns what each C launch received, per path."""
    with stand_in_gpu() as seen:
        jit, direct = [], []
        for grid, args, meta in calls:
            SCALE_ROWS[grid](*args, **meta)
            jit.append(seen.last)
        compiles = len(seen.compiles)
        for grid, args, meta in calls + calls:
            backend.launch(SCALE_ROWS, grid, args, meta)
            direct.append(seen.last)
        assert len(seen.compiles) == compiles, "the direct path compiled what Triton had compiled"
        stats = backend.launcher_stats(SCALE_ROWS)
    return jit, direct, stats


def test_direct_launch_passes_what_tritons_path_passes():
    x, y, out = _tensor(torch.float32), _tensor(torch.float32), _tensor(torch.float32)
    calls = [
        ((4,), (x, y, out, 64, 1, 0.5, True), dict(BLOCK=16, num_warps=4)),
        ((4, 2), (x, y, out, 64, 1, 0.5, True), dict(BLOCK=16, num_warps=4)),  # another grid: same binary
        ((4,), (x, _tensor(torch.float32, misaligned=True), out, 64, 1, 0.5, True), dict(BLOCK=16, num_warps=4)),
        ((4,), (x, y, out, 64, 16, 0.5, False), dict(BLOCK=16, num_warps=4)),  # stride no longer 1
        ((4,), (x, y, out, 65, 2, 0.25, True), dict(BLOCK=16, num_warps=4)),  # a new shape
        ((4,), (x.bfloat16(), y, out, 64, 1, 0.5, True), dict(BLOCK=16, num_warps=4)),  # dtype
        ((4,), (x, y, out, 64, 1, 0.5, True), dict(BLOCK=32, num_warps=8, EVEN=False)),  # constexprs, options
        ((4,), (x, None, out, 64, 1, 0.5, True), dict(BLOCK=16, num_warps=4)),  # None: a constexpr
        ((4,), (x, y, out[:40].view(8, 5).t(), 64, 8, 0.5, True), dict(BLOCK=16, num_warps=4)),  # strided view
    ]
    jit, direct, (hits, misses) = _jit_then_direct(calls)
    n = len(calls)
    for i, (grid, args, meta) in enumerate(calls):
        for run in (direct[i], direct[n + i]):
            (g, stream, function, kernel_args), (jg, jstream, jfunction, jargs) = run, jit[i]
            assert (g, stream, function) == (jg, jstream, jfunction), i
            assert len(kernel_args) == len(jargs) and all(a is b or a == b for a, b in zip(kernel_args, jargs)), i
    assert misses <= n - 1 and hits >= n + 1  # the second round is all direct


def test_positional_constexpr_values_are_keyed():
    x = _tensor(torch.float32)
    with stand_in_gpu() as seen:
        for block in (16, 32, 16, 32):
            backend.launch(POSITIONAL_CONSTEXPR, (1,), (x, 3, block, 7), {})
            assert seen.last[3][2] == block
        assert backend.launcher_stats(POSITIONAL_CONSTEXPR) == (2, 2)
        assert len(seen.compiles) == 2


def test_launch_hooks_and_pre_run_hooks_take_tritons_path():
    from triton import knobs

    x = _tensor(torch.float32)
    args, meta = (x, x, x, 64, 1, 0.5, True), dict(BLOCK=16)
    entered = []
    with stand_in_gpu():
        for _ in range(2):
            backend.launch(SCALE_ROWS, (1,), args, meta)
        assert backend.launcher_stats(SCALE_ROWS) == (1, 1)
        hook = entered.append
        knobs.runtime.launch_enter_hook.add(hook)
        try:
            backend.launch(SCALE_ROWS, (1,), args, meta)  # a profiler: Triton's path, with metadata
        finally:
            knobs.runtime.launch_enter_hook.remove(hook)
        assert backend.launcher_stats(SCALE_ROWS) == (1, 1)
        SCALE_ROWS.add_pre_run_hook(lambda *a, **k: entered.append("pre"))
        try:
            backend.launch(SCALE_ROWS, (1,), args, meta)
        finally:
            SCALE_ROWS.pre_run_hooks.clear()
        assert entered == ["pre"] and backend.launcher_stats(SCALE_ROWS) == (1, 1)
        backend.launch(SCALE_ROWS, (1,), args, meta)
        assert backend.launcher_stats(SCALE_ROWS) == (2, 1)


def test_debug_knob_change_recompiles():
    from triton import knobs

    x = _tensor(torch.float32)
    args, meta = (x, x, x, 64, 1, 0.5, True), dict(BLOCK=16)
    with stand_in_gpu() as seen, knobs.runtime.scope():
        backend.launch(SCALE_ROWS, (1,), args, meta)
        knobs.runtime.debug = True
        backend.launch(SCALE_ROWS, (1,), args, meta)
        assert len(seen.compiles) == 2  # the debug build, not the cached one


def test_interpreted_kernels_and_stand_ins_launch_as_before():
    kernel = _varlen_attention_kernels.varlen_attention_fwd_kernel
    assert backend.is_interpreted(kernel)  # this process decorates under TRITON_INTERPRET=1
    assert isinstance(backend._launcher_for(kernel), backend._PassThrough)
    launched = []

    class StandIn:
        def __getitem__(self, grid):
            return lambda *args, **meta: launched.append((grid, args, meta))

    backend.launch(StandIn(), (3,), (1, 2), {"BLOCK": 4})
    assert launched == [((3,), (1, 2), {"BLOCK": 4})]


def test_direct_launch_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("MMKERNELS_DIRECT_LAUNCH", "0")
    assert isinstance(backend._launcher_for(SCALE_ROWS), backend._PassThrough)


def test_unhashable_or_new_types_fall_back_to_tritons_path():
    x = _tensor(torch.float32)
    with stand_in_gpu() as seen:
        backend.launch(SCALE_ROWS, (1,), (x, x, x, 64, 1, 0.5, True), dict(BLOCK=16))
        backend.launch(SCALE_ROWS, (1,), (x, x, x, 64, 1, 0.5, True), dict(BLOCK=16))
        # a float where an int was, then None where a tensor was: new keys, no wrong binary
        for args in itertools.islice(itertools.cycle([(x, x, x, 64.0, 1, 0.5, True), (x, None, x, 64, 1, 0.5, True)]), 4):
            backend.launch(SCALE_ROWS, (1,), args, dict(BLOCK=16))
            assert seen.last[3][3] == args[3] and seen.last[3][1] is args[1]
        assert backend.launcher_stats(SCALE_ROWS) == (3, 3)
