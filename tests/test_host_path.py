"""The host path of the ops (what a CUDA call pays in Python before its launches): each
public op validates its arguments once per call (the custom op reuses the wrapper's
result, see ``mmkernels.backend.ValidatedHandOver``), a direct ``torch.ops.mmkernels``
call still validates, and ``tools/host_overhead.py`` measures the real launch path."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmkernels import backend, ops
from mmkernels.quant import quantize

REPO = Path(__file__).resolve().parent.parent


def _module(name):
    return importlib.import_module(f"mmkernels.ops.{name}")


def _calls():
    """(op module, call) on tiny CPU inputs, run through the interpreter."""
    ids = torch.tensor([[1, 9, 9, 2, 3]])
    embeds = torch.randn(1, 5, 16)
    feats = torch.randn(2, 16)
    qw = quantize(torch.randn(32, 64), "w8a16")
    x = torch.randn(3, 64)
    q = torch.randn(6, 2, 16)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    return [
        ("merge", lambda: ops.merge_multimodal_embeddings(ids, embeds, feats, 9)),
        ("patch_embed", lambda: ops.patch_embed(torch.randn(1, 3, 8, 8), torch.randn(16, 3, 4, 4))),
        ("quantized_linear", lambda: ops.quantized_linear(x, qw, activation="gelu")),
        ("varlen_attention", lambda: ops.varlen_attention(q, q, q, cu, cu, 4, 4)),
    ]


@pytest.mark.parametrize("name,call", _calls(), ids=[name for name, _ in _calls()])
def test_public_op_validates_once_per_call(monkeypatch, name, call):
    module = _module(name)
    original = module._validate
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "_validate", counting)
    if module.OP.validate is original:  # the op's own validation of its inputs, if a direct call needs it
        monkeypatch.setattr(module.OP, "validate", counting)
    out = call()
    assert torch.isfinite(out).all()
    assert len(calls) == 1, f"{name}: _validate ran {len(calls)} times for one call"
    assert backend.recent_decisions()[-1].backend is backend.Backend.INTERPRETER


@pytest.mark.parametrize("name,call", _calls(), ids=[name for name, _ in _calls()])
def test_kernels_launch_under_the_inputs_device_guard(monkeypatch, name, call):
    """Triton launches on the current CUDA device: each op enters its inputs' device
    (``backend.device_guard``) around its kernels, not around the reference."""
    module = _module(name)
    launched_inside = []
    guard_depth = []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            guard_depth.append(self.device)

        def __exit__(self, *exc):
            guard_depth.pop()

    def impl(*args, **kwargs):
        launched_inside.append(list(guard_depth))
        return original_impl(*args, **kwargs)

    original_impl = module.OP.launch  # the op's launcher, run by the scaffold (backend.Op)
    monkeypatch.setattr(backend, "device_guard", Recorder)
    monkeypatch.setattr(module.OP, "launch", impl)
    assert torch.isfinite(call()).all()
    assert launched_inside == [[torch.device("cpu")]], launched_inside


def test_device_guard_switches_only_to_another_cuda_device(monkeypatch):
    entered = []

    class FakeCudaDevice:  # stands in for torch.cuda.device on this CUDA-less machine
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            entered.append(self.index)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", FakeCudaDevice)
    for device in (torch.device("cpu"), torch.device("cuda", 0)):
        with backend.device_guard(device):
            pass
    assert entered == []
    with backend.device_guard(torch.device("cuda", 1)):
        assert entered == [1]


def test_direct_custom_op_call_still_validates():
    # Nothing handed over: the op validates itself and names the argument.
    q = torch.randn(6, 2, 16)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        torch.ops.mmkernels.varlen_attention(q, q, q, cu, cu[:2], 4, 4, 0.25, False, None)


def _dispatches(monkeypatch, name, call) -> bool:
    """Whether a call of the public op goes through its registered custom op."""
    declared = _module(name).OP
    op = declared.op
    entered = []

    def recording(*args):
        entered.append(1)
        return op(*args)

    monkeypatch.setattr(declared, "op", recording)
    out = call()
    assert torch.isfinite(out).all()
    monkeypatch.setattr(declared, "op", op)
    return bool(entered)


@pytest.mark.parametrize("name,call", _calls(), ids=[name for name, _ in _calls()])
def test_plain_eager_calls_skip_the_dispatcher(monkeypatch, name, call):
    """A plain eager call runs the op's body directly (the custom-op dispatch costs ~8 us
    and does nothing there); one validation, same backend decision."""
    assert not _dispatches(monkeypatch, name, call)
    assert backend.recent_decisions()[-1].backend is backend.Backend.INTERPRETER


class _RecordingMode(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name,call", _calls(), ids=[name for name, _ in _calls()])
def test_dispatcher_level_features_still_see_the_op(monkeypatch, name, call):
    # A dispatch mode (what FakeTensorMode, FlopCounterMode, DebugMode are) sees the op.
    with _RecordingMode() as mode:
        assert _dispatches(monkeypatch, name, call)
    assert any(op.startswith("mmkernels.") for op in mode.ops), mode.ops[:5]
    # The autograd profiler records it.
    with torch.autograd.profiler.profile() as prof:
        assert _dispatches(monkeypatch, name, call)
    assert any(event.name.startswith("mmkernels::") for event in prof.function_events)
    # A function mode (here torch's default-device context).
    with torch.device("cpu"):
        assert _dispatches(monkeypatch, name, call)


def test_dispatcher_needed_for_autograd_subclasses_and_meta():
    x = torch.randn(3)
    assert not backend.dispatcher_needed((x, [x, x], [3, 4], None, 3, "gelu"))
    w = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    assert not backend.dispatcher_needed((x, w))
    needs_grad = torch.randn(3, requires_grad=True)
    assert backend.dispatcher_needed((x, [needs_grad]))  # inside a list too
    with torch.no_grad():
        assert not backend.dispatcher_needed((x, needs_grad))  # no graph to record
    assert backend.dispatcher_needed((torch.empty(3, device="meta"),))

    class Sub(torch.Tensor):
        pass

    assert backend.dispatcher_needed((x.as_subclass(Sub),))
    assert backend.dispatcher_needed((x,)) is False
    assert torch.func.vmap(lambda t: torch.tensor(backend.dispatcher_needed((t,))))(torch.randn(2, 3)).all()


def test_hand_over_only_for_the_same_inputs():
    hand_over = backend.ValidatedHandOver()
    a, b = torch.zeros(2), torch.zeros(2)
    taken = []
    hand_over.call(lambda *inputs: taken.append(hand_over.take(inputs)), (a, [a, b], 3, "gelu"), "validated")
    hand_over.call(lambda *inputs: taken.append(hand_over.take((b, *inputs[1:]))), (a, [a, b], 3, "gelu"), "validated")
    hand_over.call(lambda *inputs: taken.append(hand_over.take((a, (a, b), 3, "gelu"))), (a, [a, b], 3, "gelu"), "v")
    hand_over.call(lambda *inputs: taken.append(hand_over.take((a, [a, b], 3.0, "gelu"))), (a, [a, b], 3, "gelu"), "v")
    assert taken == ["validated", None, "v", None]
    # Taken once, and cleared after the call even when the op raised.
    with pytest.raises(RuntimeError):
        hand_over.call(lambda *inputs: (_ for _ in ()).throw(RuntimeError("op failed")), (a,), "v")
    assert hand_over.take((a,)) is None


def test_host_overhead_tool_measures_the_real_launch_path(tmp_path):
    """The tool runs in its own process (its kernels must be compiled-path JITFunctions,
    this one decorates them for the interpreter): every op through Triton's real launch
    path with a stand-in driver, the launches per call counted at the stubbed C launch,
    the anchors and the Hugging Face / vLLM routes beside them. A check that the tool
    works, not a timed test."""
    out = tmp_path / "host.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "host_overhead.py"), "--rounds", "1", "--calls", "2",
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {(row["case"], row["route"]): row for row in result["rows"]}
    launches = {case: row["kernels"] for (case, route), row in rows.items() if route == "mmkernels"}
    # One 640-token prompt without the count check: one launch (the rows count their own prefix).
    assert launches["llava-1.5-7b/1x1img"] == {"merge_rows_kernel": 1}
    assert launches["llava-1.5-7b/16x1img"] == {"merge_count_kernel": 1, "merge_rows_kernel": 1}
    # One image: the gather stays in the GEMM (few rows; packing first would add a launch).
    assert launches["siglip-so400m-14-384/b1"] == {"patch_embed_kernel": 1}
    # Small M splits K: the GEMM and the fixed-order sum of the shares.
    assert launches["llava-1.5-7b/linear_1/m16/w8a16"] == {"quantized_linear_kernel": 1, "splitk_epilogue_kernel": 1}
    assert launches["llava-1.5-7b/linear_1/m576/w4a16"] == {"quantized_linear_kernel": 1}
    assert launches["whisper-large-v3/cross-8x64"] == {"varlen_attention_fwd_kernel": 1}
    # The real backend choice ran and chose the compiled kernels.
    assert set(result["backends"].values()) == {"triton"}, result["backends"]
    assert rows[("torch.empty + empty 3-param kernel", "anchor")]["launches_per_call"] == 1
    assert {route for _, route in rows} == {"mmkernels", "anchor", "hf", "vllm"}
    assert all(row["us_per_call"] > 0 for row in rows.values())
    # A repeated call runs from its call plan (mmkernels.backend.CallPlans): a path that
    # stops qualifying (a new temporary, a torch op between launches) shows here.
    not_replayed = [case for (case, route), row in rows.items() if route == "mmkernels" and not row["replayed"]]
    assert not not_replayed, not_replayed
    assert "budget" in proc.stdout


def test_alignment_hints_only_where_the_jit_cannot_see_them():
    def patch_rows(t, stride):  # how patch_embed asks (weight rows, flat patch rows)
        return backend.aligned_elements([t], [stride])

    def attention(*tensors):  # how varlen_attention asks (token and head strides)
        return backend.aligned_elements(tensors, [st for t in tensors for st in t.stride()[:2]])

    bf16 = torch.bfloat16
    # K = 1176 (Qwen2-VL): rows 16-byte aligned (8 bf16), not at 16-element multiples.
    assert patch_rows(torch.empty(64, 1176, dtype=bf16), 1176) == 8
    assert patch_rows(torch.empty(64, 1176), 1176) == 4  # fp32: 16 bytes = 4
    assert patch_rows(torch.empty(64, 588, dtype=bf16), 588) == 4  # 8 bytes
    assert patch_rows(torch.empty(64, 1024, dtype=bf16), 1024) == 1  # the JIT proves it
    assert patch_rows(torch.empty(64, 1177, dtype=bf16)[:, 1:], 1177) == 1  # odd: nothing
    q = torch.empty(10, 16, 72, dtype=bf16)
    assert attention(q, q, q) == 8
    assert attention(*[torch.empty(10, 16, 64, dtype=bf16)] * 3) == 1  # multiples of 16 already
    assert attention(q[:, :, 1:], q, q) == 1  # a base off 16 bytes


def test_compute_capability_is_asked_once_per_device(monkeypatch):
    """Every CUDA call checks the kernel's minimum compute capability; the property is
    read from torch once per device (it is several microseconds of Python per ask)."""
    asked = []

    def capability(index):
        asked.append(index)
        return {0: (9, 0), 1: (7, 5)}[index]

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    backend._compute_capability.cache_clear()
    try:
        caps = backend.Capabilities(frozenset({torch.bfloat16}), min_compute_capability=(8, 0))
        for _ in range(3):
            assert caps.not_supported_reasons(torch.device("cuda:0"), [torch.bfloat16]) == []
            assert caps.not_supported_reasons(torch.device("cuda"), [torch.bfloat16]) == [
                "compute capability 7.5 < required 8.0"]  # fmt: skip
        assert asked == [0, 1]
    finally:
        backend._compute_capability.cache_clear()



def test_backend_decisions_are_cached_and_a_forced_scope_still_forces(monkeypatch):
    """choose_backend decides once per key; force_backend is part of the key, and
    refresh_environment / clear_decision_cache forget what was decided."""
    calls = []
    real = backend._decide

    def counting(*args):
        calls.append(args[0])
        return real(*args)

    monkeypatch.setattr(backend, "_decide", counting)
    backend.clear_decision_cache()
    ids, embeds, feats = torch.tensor([[1, 9, 9]]), torch.randn(1, 3, 16), torch.randn(2, 16)
    for _ in range(3):
        ops.merge_multimodal_embeddings(ids, embeds, feats, 9)
        assert backend.recent_decisions()[-1].backend is backend.Backend.INTERPRETER
    assert len(calls) == 1
    with backend.force_backend(backend.Backend.REFERENCE):
        for _ in range(2):
            ops.merge_multimodal_embeddings(ids, embeds, feats, 9)
            assert backend.recent_decisions()[-1].backend is backend.Backend.REFERENCE
    assert len(calls) == 2
    ops.merge_multimodal_embeddings(ids, embeds, feats, 9)
    assert backend.recent_decisions()[-1].backend is backend.Backend.INTERPRETER
    ops.merge_multimodal_embeddings(ids, embeds.double(), feats.double(), 9)  # another dtype: decided anew
    assert len(calls) == 3
    # A changed environment, once refreshed, is seen (and the decisions made again).
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    backend.refresh_environment()
    try:
        assert not backend.interpreter_enabled()
        ops.merge_multimodal_embeddings(ids, embeds, feats, 9)
        decision = backend.recent_decisions()[-1]
        assert decision.backend is backend.Backend.REFERENCE and "TRITON_INTERPRET is not set" in str(decision)
    finally:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        backend.refresh_environment()
    ops.merge_multimodal_embeddings(ids, embeds, feats, 9)
    assert backend.recent_decisions()[-1].backend is backend.Backend.INTERPRETER


def test_patch_embed_takes_a_precomputed_normalization_table():
    from mmkernels.ops.patch_embed import pixel_norm_table

    pixels = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    weight = torch.randn(16, 3, 4, 4)
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    norm = pixel_norm_table(mean, std, 1 / 255, channels=3, device="cpu")
    assert norm.shape == (3, 3) and norm.dtype == torch.float32 and norm.is_contiguous()
    want = ops.patch_embed(pixels, weight, pixel_mean=mean, pixel_std=std, pixel_scale=1 / 255)
    got = ops.patch_embed(pixels, weight, pixel_norm=norm)
    assert backend.recent_decisions()[-1].backend is backend.Backend.INTERPRETER
    assert torch.equal(got, want)
    assert torch.equal(ops.patch_embed_reference(pixels, weight, pixel_norm=norm),
                       ops.patch_embed_reference(pixels, weight, pixel_mean=mean, pixel_std=std, pixel_scale=1 / 255))
    with pytest.raises(ValueError, match="pixel_norm: pass either"):
        ops.patch_embed(pixels, weight, pixel_norm=norm, pixel_mean=mean)
    with pytest.raises(ValueError, match=r"pixel_norm: expected shape \(3, 3\)"):
        ops.patch_embed(pixels, weight, pixel_norm=norm[:2])
    with pytest.raises(TypeError, match="pixel_norm: expected dtype float32"):
        ops.patch_embed(pixels, weight, pixel_norm=norm.double())
