"""Routes and route tables (mmkernels.routes, mmkernels.tune) on the CPU: every route of
every op with routes against the op's reference in the interpreter; tables written, read
back, keyed by GPU and versions, shared by two processes under the lock, ignored with one
warning when corrupt or foreign; the op taking a table's route (and saying so); `tune`
over a tiny model folder end to end with a stand-in timer and device identity."""

import importlib
import json
import multiprocessing
import warnings

import pytest
import torch

from mmkernels import backend, ops, routes, tune
from mmkernels.quant import quantize
from mmkernels.testing import assert_close, poison_outputs

PATCH_EMBED = importlib.import_module("mmkernels.ops.patch_embed")
QUANTIZED_LINEAR = importlib.import_module("mmkernels.ops.quantized_linear")
STAND_IN = routes.DeviceIdentity("Stand-in GPU", "9.0", torch.__version__, "3.8.0")


@pytest.fixture
def tables(tmp_path, monkeypatch):
    """The user's and the shipped table in tmp_path, read for CPU calls as if on the stand-in GPU."""
    monkeypatch.setenv("MMKERNELS_CACHE_DIR", str(tmp_path / "cache"))
    shipped = tmp_path / "shipped" / "routes.json"
    monkeypatch.setattr(routes, "shipped_table_path", lambda: shipped)
    monkeypatch.setattr(routes, "device_identity", lambda device: STAND_IN)
    monkeypatch.setattr(routes, "TABLE_DEVICE_TYPES", {"cuda", "cpu"})
    routes.reload_tables()
    yield routes.user_table_path(), shipped
    routes.reload_tables()


def _patch_embed_inputs() -> dict[str, tuple[tuple, dict]]:
    """(args, kwargs) of patch_embed calls of each form, fixed per case."""
    gen = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    uint8 = torch.randint(0, 256, (2, 3, 30, 30), generator=gen, dtype=torch.uint8)
    return {
        "image-cls-pos": ((r(2, 3, 28, 29), r(24, 3, 7, 7), r(24)),
                          dict(class_embedding=r(24), position_embedding=r(1 + 16, 24))),
        "image-uint8-norm": ((uint8, r(24, 3, 6, 6), None),
                             dict(pixel_mean=torch.tensor([0.4, 0.5, 0.6]), pixel_std=torch.tensor([0.2, 0.25, 0.3]),
                                  pixel_scale=1 / 255)),
        "flat-conv3d": ((r(37, 3 * 2 * 4 * 4), r(20, 3, 2, 4, 4), r(20)), {}),
        # channels_last pixels cropped out of a larger image, bf16, per-image position tables
        "image-strided-bf16": ((r(2, 40, 33, 3).bfloat16().permute(0, 3, 1, 2)[:, :, 3:, 2:], r(16, 3, 5, 5).bfloat16(),
                                r(16).bfloat16()), dict(position_embedding=r(2, 42, 16).bfloat16())),
    }  # fmt: skip


@pytest.mark.parametrize("route", ["heuristic", *PATCH_EMBED.OP.routes])
@pytest.mark.parametrize("case", list(_patch_embed_inputs()))
def test_every_patch_embed_route_matches_the_reference(route, case):
    args, kwargs = _patch_embed_inputs()[case]
    if route == "torch-unfold" and case.startswith("flat"):
        with routes.force_route("patch_embed", route), pytest.raises(ValueError, match="already one cuBLAS GEMM"):
            ops.patch_embed(*args, **kwargs)
        return
    with routes.force_route("patch_embed", route), poison_outputs():
        out = ops.patch_embed(*args, **kwargs)
    decision = backend.recent_decisions()[-1]
    assert (decision.route, decision.route_source) == (route, "forced")
    k = args[1][0].numel()
    assert_close(out, ops.patch_embed_reference(*args, **kwargs), reduction_length=k)
    assert not out.isnan().any()


@pytest.mark.parametrize("route", ["heuristic", *QUANTIZED_LINEAR.OP.routes])
@pytest.mark.parametrize("scheme", ["w8a16", "w4a16", "fp8"])
@pytest.mark.parametrize("m", [1, 70])
def test_every_quantized_linear_route_matches_the_reference(route, scheme, m):
    gen = torch.Generator().manual_seed(2)
    qw = quantize(torch.randn(40, 1024, generator=gen), scheme, **({"group_size": 32} if scheme == "w4a16" else {}))
    x, bias = torch.randn(m, 1024, generator=gen), torch.randn(40, generator=gen)
    args = QUANTIZED_LINEAR.OP.validate(x, qw.packed, qw.scales, qw.zeros, bias, scheme, qw.group_size or 0, "gelu")
    why = QUANTIZED_LINEAR.OP.routes[route].reason_not(args) if route != "heuristic" else None
    if route == "triton-no-split-k":
        assert (why is None) == (m == 1)  # the heuristic splits K up to 64 rows
    with routes.force_route("quantized_linear", route), poison_outputs():
        if why is not None:  # a route that cannot take the call says why (no split at M = 70, fp8's layout)
            with pytest.raises(ValueError, match="force_route"):
                ops.quantized_linear(x, qw, bias, activation="gelu")
            return
        out = ops.quantized_linear(x, qw, bias, activation="gelu")
    assert backend.recent_decisions()[-1].route == route
    assert_close(out, ops.quantized_linear_reference(x, qw, bias, activation="gelu"), reduction_length=1024)
    assert not out.isnan().any()


def test_large_weight_only_calls_default_to_the_standard_route_until_a_table_says_otherwise(tables, monkeypatch):
    """From _STANDARD_FROM_ROWS rows a w8a16/w4a16 call takes dequantize + cuBLAS by
    default (the decision says "default"); fp8 (no weight-only PyTorch path) and smaller
    calls keep the launcher; a table entry for the bucket wins over the default."""
    monkeypatch.setattr(QUANTIZED_LINEAR, "_STANDARD_FROM_ROWS", 64)  # the rule at interpreter sizes
    user, _ = tables
    gen = torch.Generator().manual_seed(4)
    for scheme in ("w8a16", "w4a16", "fp8"):
        qw = quantize(torch.randn(48, 64, generator=gen), scheme, **({"group_size": 32} if scheme == "w4a16" else {}))
        small, large = torch.randn(63, 64, generator=gen), torch.randn(64, 64, generator=gen)
        ops.quantized_linear(small, qw)
        assert backend.recent_decisions()[-1].route is None, scheme
        out = ops.quantized_linear(large, qw)
        decision = backend.recent_decisions()[-1]
        want = (None, None) if scheme == "fp8" else ("torch", "default")
        assert (decision.route, decision.route_source) == want, scheme
        assert_close(out, ops.quantized_linear_reference(large, qw), reduction_length=64)
    qw = quantize(torch.randn(48, 64, generator=gen), "w8a16")
    large = torch.randn(64, 64, generator=gen)
    args = QUANTIZED_LINEAR.OP.validate(large, qw.packed, qw.scales, qw.zeros, None, "w8a16", 0, "none")
    routes.write_entries(user, [_entry("quantized_linear[w8a16]", QUANTIZED_LINEAR.bucket(args), "heuristic",
                                       heuristic=1.0, torch=2.0)])  # fmt: skip
    ops.quantized_linear(large, qw)
    decision = backend.recent_decisions()[-1]
    assert (decision.route, decision.route_source) == ("heuristic", "measured")


def test_forcing_a_route_that_cannot_take_the_call_names_why():
    qw = quantize(torch.randn(16, 32), "fp8")
    with routes.force_route("quantized_linear", "torch"), pytest.raises(ValueError, match="fp8 quantizes the activations"):
        ops.quantized_linear(torch.randn(3, 32), qw)
    with routes.force_route("quantized_linear[w8a16]", "gather"), pytest.raises(ValueError, match="no route 'gather'"):
        ops.quantized_linear(torch.randn(3, 32), quantize(torch.randn(16, 32), "w8a16"))


def _entry(op, bucket, winner, gpu="Stand-in GPU", **medians):
    return routes.TableEntry(gpu, STAND_IN.cc, STAND_IN.torch, STAND_IN.triton, op, bucket, winner,
                             medians or {winner: 1.0})  # fmt: skip


def _linear_call(m=20):
    """(call, its shape bucket, x, qw) of a quantized_linear call with ``m`` rows."""
    gen = torch.Generator().manual_seed(3)
    qw = quantize(torch.randn(48, 64, generator=gen), "w8a16")
    x = torch.randn(m, 64, generator=gen)
    args = QUANTIZED_LINEAR.OP.validate(x, qw.packed, qw.scales, qw.zeros, None, "w8a16", 0, "none")
    return (lambda: ops.quantized_linear(x, qw)), QUANTIZED_LINEAR.bucket(args), x, qw


def _applicable(x, qw) -> set[str]:
    """The candidates of a w8a16 quantized_linear call (the heuristic and every route that takes it)."""
    op = QUANTIZED_LINEAR.OP
    args = op.validate(x, qw.packed, qw.scales, qw.zeros, None, qw.scheme, qw.group_size or 0, "none")
    return {"heuristic", *(name for name, route in op.routes.items() if route.reason_not(args) is None)}


def test_a_table_entry_chooses_the_route_and_the_decision_says_so(tables):
    user, shipped = tables
    call, bucket, x, qw = _linear_call()
    call()
    assert backend.recent_decisions()[-1].route is None  # no table entry: the heuristic
    call()  # a call plan replays (recorded under the heuristic)
    routes.write_entries(shipped, [_entry("quantized_linear[w8a16]", bucket, "heuristic", torch=2.0, heuristic=1.0)])
    call()
    assert (backend.recent_decisions()[-1].route, backend.recent_decisions()[-1].route_source) == ("heuristic", "shipped")
    # The user's table wins over the shipped one; writing it drops plans made under the old choice.
    routes.write_entries(user, [_entry("quantized_linear[w8a16]", bucket, "torch", torch=1.0, heuristic=2.0)])
    out = call()
    decision = backend.recent_decisions()[-1]
    assert (decision.route, decision.route_source) == ("torch", "measured")
    assert "via torch (measured)" in str(decision)
    assert_close(out, ops.quantized_linear_reference(x, qw), reduction_length=64)
    call_other_bucket, other, _, _ = _linear_call(m=200)
    assert other != bucket
    call_other_bucket()
    assert backend.recent_decisions()[-1].route is None


def test_entries_are_keyed_by_gpu_and_versions(tables):
    user, _ = tables
    call, bucket, _, _ = _linear_call()
    other_gpu = _entry("quantized_linear[w8a16]", bucket, "torch", gpu="Another GPU")
    other_torch = routes.TableEntry(STAND_IN.gpu, STAND_IN.cc, "1.0", STAND_IN.triton, "quantized_linear[w8a16]",
                                    bucket, "torch", {"torch": 1.0})  # fmt: skip
    routes.write_entries(user, [other_gpu, other_torch])
    call()
    assert backend.recent_decisions()[-1].route is None
    assert len(routes.read_table(user)) == 2
    # An entry naming a route this mmkernels does not have (another version's table): the heuristic.
    routes.write_entries(user, [_entry("quantized_linear[w8a16]", bucket, "split-k-9000")])
    call()
    assert backend.recent_decisions()[-1].route is None


@pytest.mark.parametrize("text", ["{not json", json.dumps({"format": "something-else", "version": 1}),
                                  json.dumps({"format": "mmkernels-routes", "version": 99, "entries": []})])  # fmt: skip
def test_a_corrupt_or_foreign_table_is_ignored_with_one_warning(tables, text):
    user, _ = tables
    user.parent.mkdir(parents=True, exist_ok=True)
    user.write_text(text)
    call = _linear_call()[0]
    with pytest.warns(UserWarning, match="ignoring the route table"):
        call()
    assert backend.recent_decisions()[-1].route is None
    routes.reload_tables()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call()  # read again, not warned again
    with pytest.warns(UserWarning, match="replacing an unreadable route table"):
        routes.write_entries(user, [_entry("patch_embed", "b", "torch")])
    assert [e.winner for e in routes.read_table(user)] == ["torch"]


def _write_many(path, worker):
    for i in range(15):
        routes.write_entries(path, [_entry("patch_embed", f"w{worker}-{i}", "torch")])


def test_two_processes_share_the_table_under_the_lock(tmp_path):
    path = tmp_path / "routes.json"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_write_many, args=(path, w)) for w in range(2)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(120)
        assert p.exitcode == 0
    assert sorted(e.bucket for e in routes.read_table(path)) == sorted(f"w{w}-{i}" for w in range(2) for i in range(15))


def test_tune_over_a_tiny_model_folder_end_to_end(tables, tmp_path, monkeypatch):
    """A stand-in timer that prefers cuDNN for patch_embed and the heuristic elsewhere: the
    table says so, the ops then take those routes, and a second run resumes (skips)."""
    pytest.importorskip("transformers")
    from mmkernels import zoo

    folder = zoo.save("llava", tmp_path / "tiny-llava")
    timed = []
    current = {}

    def timer(fn, capturable):
        assert torch.isfinite(fn()).all()
        op, route = current["op"], current["route"]
        timed.append((op, route))
        if op == "patch_embed":
            return {"torch": 1.0, "heuristic": 2.0}.get(route, 3.0), "cuda-graph"
        return {"heuristic": 1.0}.get(route, 2.0), "cuda-graph"

    real_candidates = tune._candidates

    def labelled(op, name, run):  # tells the stand-in timer which route it times
        def go(args):
            current.update(op=op.name, route=name)
            return run(args)

        return go

    monkeypatch.setattr(tune, "_candidates",
                        lambda op: {name: labelled(op, name, run) for name, run in real_candidates(op).items()})
    argv = [str(folder), "--images", "1,2", "--schemes", "w4a16,w8a16", "--group-size", "32", "--dtype", "float32"]
    assert tune.main(argv, timer=timer, device=torch.device("cpu"), identity=STAND_IN) == 0
    entries = {(e.op, e.bucket): e for e in routes.read_table(tables[0])}
    assert {op for op, _ in entries} == {"patch_embed", "quantized_linear[w8a16]", "quantized_linear[w4a16]"}
    assert all(e.winner == ("torch" if e.op == "patch_embed" else "heuristic") for e in entries.values())
    assert all(bucket.endswith("-g32") for op, bucket in entries if op == "quantized_linear[w4a16]")  # --group-size
    patch_entry = next(e for (op, _), e in entries.items() if op == "patch_embed")
    assert set(patch_entry.medians_ms) == {"heuristic", "torch", "torch-unfold", "triton-packed", "triton-gather",
                                           "triton-row_steps"}
    assert {"heuristic", "torch"} <= {route for _, route in timed}
    timed.clear()
    assert tune.main(argv, timer=timer, device=torch.device("cpu"), identity=STAND_IN) == 0
    assert timed == []  # every bucket in the table already: nothing timed again
    # A patch embedding of the tiny model's shape now runs the table's route.
    ops.patch_embed(torch.randn(1, 3, 56, 56), torch.randn(64, 3, 14, 14))
    decision = backend.recent_decisions()[-1]
    assert (decision.route, decision.route_source) == ("torch", "measured")


def test_tune_model_times_the_vision_attention_a_patch_gives_cu_seqlens(tables, tmp_path):
    """A Qwen2-VL folder: varlen_attention cases at its vision attention (heads and head
    dim from the layer, images of the tower's patch count packed along cu_seqlens), and
    every route that applies agrees with the reference there."""
    pytest.importorskip("transformers")
    from mmkernels import zoo

    folder = zoo.save("qwen2_vl", tmp_path / "tiny-qwen2-vl")
    cases = tune.model_cases(str(folder), device=torch.device("cpu"), dtype=torch.float32, images=[1, 2],
                             schemes=["w8a16"])  # fmt: skip
    attention = [case for case in cases if case.op.name == "varlen_attention"]
    # One layer shape (every block's attention is alike): one case per image count.
    assert [case.name for case in attention] == [f"varlen_attention/model.visual.blocks.0.attn/x{n}" for n in (1, 2)]
    q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, kv_ranges = attention[1].make_inputs()
    per_image = max_q
    assert q.shape == (2 * per_image, 2, 32) and cu_q.tolist() == [0, per_image, 2 * per_image] and not causal
    # In bf16 with a 66-token image, where every route applies (the tile routes: 64-query
    # tiles where the heuristic takes 128, 128-key tiles for heads at most 64 wide).
    cu = torch.tensor([0, 30, 96], dtype=torch.int32)
    small = tune.TuneCase("varlen_attention/small", attention[0].op, lambda: (
        q[:96].bfloat16(), k[:96].bfloat16(), v[:96].bfloat16(), cu, cu, 66, 66, scale, False, None))  # fmt: skip
    import io

    progress = io.StringIO()
    (result,) = tune.tune([small], identity=STAND_IN, timer=lambda fn, capturable: (1.0, "eager"), table=tables[0],
                          progress=progress)  # fmt: skip
    assert result.rejected == {}
    assert set(result.medians_ms) == {"heuristic", "torch", "triton-block_m64", "triton-block_n128"}
    # Each case says what it found and how long is left.
    lines = progress.getvalue().splitlines()
    assert lines[0].startswith("[1/1] varlen_attention/small (varlen_attention b2-q128")
    assert f"{result.winner} won at 1000.0 us of 4 timed" in lines[1] and "about 0 s left" in lines[1], lines


def test_tune_rejects_a_route_that_disagrees_with_the_reference(tables, monkeypatch):
    case = tune.TuneCase("wrong", PATCH_EMBED.OP, lambda: (torch.randn(1, 3, 8, 8), torch.randn(16, 3, 4, 4), None,
                                                         None, None, None, None, None, None))  # fmt: skip
    wrong = routes.Route("torch", lambda args: torch.zeros(1, 4, 16))
    monkeypatch.setitem(PATCH_EMBED.OP.routes, "torch", wrong)
    (result,) = tune.tune([case], identity=STAND_IN, timer=lambda fn, capturable: (1.0, "eager"), table=tables[0])
    assert "torch" in result.rejected and "relative error" in result.rejected["torch"]
    assert result.winner != "torch" and "torch" not in result.medians_ms


def test_tune_command_refuses_clearly(capsys):
    if not torch.cuda.is_available():
        assert tune.main(["some/model"]) == tune.EXIT_REFUSED
        assert "needs a CUDA GPU" in capsys.readouterr().err
    assert tune.main([]) == tune.EXIT_REFUSED
    assert "pass MODEL or --benchmark-shapes" in capsys.readouterr().err
    assert tune.main(["m", "--images", "0"], device=torch.device("cpu"), identity=STAND_IN) == tune.EXIT_REFUSED
    assert tune.main(["m", "--schemes", "int3"], device=torch.device("cpu"), identity=STAND_IN) == tune.EXIT_REFUSED
    err = capsys.readouterr().err
    assert "--images: expected positive integers" in err and "--schemes: expected names from" in err
    from mmkernels.bench import cli

    assert cli(["tune", "--benchmark-shapes", "x"]) == tune.EXIT_REFUSED


def test_benchmark_shapes_tune_all_four_ops(tables):
    cases = tune.benchmark_cases(device=torch.device("cpu"), schemes=["w8a16", "fp8"], quick=True, scaled=True)
    by_op = {}
    for case in cases:
        by_op.setdefault(case.op.name, case)
    assert set(by_op) == {"patch_embed", "quantized_linear", "merge_multimodal_embeddings", "varlen_attention"}
    results = tune.tune(list(by_op.values()), identity=STAND_IN, timer=lambda fn, capturable: (fn(), (1.0, "eager"))[1],
                        table=tables[0])  # fmt: skip
    for result in results:  # every standard route passed its check against the reference
        assert result.winner is not None and "torch" in result.medians_ms, result


def test_the_shipped_table_is_readable_and_names_known_routes():
    entries = routes.read_table(routes.shipped_table_path())  # raises on a malformed file
    declared = [importlib.import_module(f"mmkernels.ops.{name}") for name in ops.OP_MODULES]
    known = {op.decision_name: {"heuristic", *op.routes} for m in declared for op in (m.OP, getattr(m, "OP_INPLACE", m.OP))}
    for entry in entries:
        assert entry.winner in known[entry.op.split("[")[0]], entry
        assert entry.winner in entry.medians_ms and min(entry.medians_ms.values()) == entry.medians_ms[entry.winner]


def test_the_patch_report_note_says_what_chooses_routes(tables):
    from mmkernels.integrations.engine import backend_note

    user, shipped = tables
    weight = torch.empty(4, 3, 2, 2)
    assert "no route table entry for Stand-in GPU" in backend_note(PATCH_EMBED.CAPABILITIES, weight, routed=True)
    routes.write_entries(user, [_entry("patch_embed", "b1", "torch"), _entry("patch_embed", "b2", "heuristic")])
    routes.write_entries(shipped, [_entry("patch_embed", "b3", "torch")])
    note = backend_note(PATCH_EMBED.CAPABILITIES, weight, routed=True)
    assert "2 buckets measured on this GPU, 1 shipped" in note
    assert "routes" not in backend_note(PATCH_EMBED.CAPABILITIES, weight)  # an op without routes


def test_the_torch_route_keeps_the_op_dtype_and_layout():
    """bf16 weight with a float32 position table: the op's output is bf16 and contiguous on every route."""
    pixels, weight = torch.randn(2, 3, 8, 8), torch.randn(16, 3, 4, 4).to(torch.bfloat16)
    position = torch.randn(4, 16)
    outs = {}
    for route in ("heuristic", "torch"):
        with routes.force_route("patch_embed", route):
            outs[route] = ops.patch_embed(pixels, weight, position_embedding=position)
            no_table = ops.patch_embed(pixels, weight)
        assert outs[route].dtype == torch.bfloat16 and outs[route].is_contiguous()
        assert no_table.dtype == torch.bfloat16 and no_table.is_contiguous()
    assert_close(outs["torch"], outs["heuristic"].to(torch.float32).to(torch.bfloat16), reduction_length=48)


def _logging_timer(log):
    """A stand-in timer: runs the route once, appends a line to ``log``; the first
    candidate timed is the fastest."""
    timed = []

    def timer(fn, capturable):
        fn()
        timed.append(1)
        with open(log, "a") as f:
            f.write(f"{len(timed)}\n")
        return float(len(timed)), "cuda-graph"

    return timer


@pytest.fixture
def autotune_on(tables, monkeypatch):
    monkeypatch.setenv("MMKERNELS_AUTOTUNE", "1")
    routes.reload_tables()
    timed = []

    def default_timer(device):
        def timer(fn, capturable):
            fn()
            timed.append(1)
            return float(len(timed)), "cuda-graph"  # the first candidate timed is the fastest

        return timer

    monkeypatch.setattr(tune, "default_timer", default_timer)
    return timed


def test_autotune_tunes_a_missing_bucket_at_its_first_call(tables, autotune_on):
    call, bucket, x, qw = _linear_call()
    out = call()
    assert autotune_on, "the first call of the bucket timed its routes"
    (entry,) = routes.read_table(tables[0])
    assert (entry.op, entry.bucket, entry.winner) == ("quantized_linear[w8a16]", bucket, "heuristic")
    assert set(entry.medians_ms) == _applicable(x, qw)
    decision = backend.recent_decisions()[-1]
    assert (decision.route, decision.route_source) == ("heuristic", "measured")
    assert_close(out, ops.quantized_linear_reference(x, qw), reduction_length=64)
    autotune_on.clear()
    call()
    call()
    assert autotune_on == []  # tuned once: later calls read the table (or replay a plan)


@pytest.mark.parametrize("when", ["compiling", "capturing"])
def test_autotune_never_runs_while_compiling_or_capturing(tables, autotune_on, monkeypatch, when):
    if when == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    else:
        monkeypatch.setattr(routes, "_capturing", lambda: True)
    call, bucket, _, _ = _linear_call()
    call()
    assert autotune_on == [] and routes.read_table(tables[0]) == []
    assert backend.recent_decisions()[-1].route is None  # the heuristic
    monkeypatch.undo()


def _autotune_in_a_process(cache_dir, log):
    import os

    os.environ["MMKERNELS_CACHE_DIR"] = str(cache_dir)
    os.environ["MMKERNELS_AUTOTUNE"] = "1"
    routes.device_identity = lambda device: STAND_IN
    routes.TABLE_DEVICE_TYPES.add("cpu")
    tune.default_timer = lambda device: _logging_timer(log)
    routes.reload_tables()
    _linear_call()[0]()


def test_two_processes_autotune_a_bucket_once(tmp_path):
    log = tmp_path / "timed.log"
    # Spawned, not forked: a child forked after torch's thread pool started can hang in its ops.
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_autotune_in_a_process, args=(tmp_path / "cache", log)) for _ in range(2)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(300)
        assert p.exitcode == 0
    # One process timed the candidates; the other waited for the lock and found the entry.
    _, _, x, qw = _linear_call()
    assert len(log.read_text().split()) == len(_applicable(x, qw))
    assert len(routes.read_table(tmp_path / "cache" / "routes.json")) == 1


MERGE = importlib.import_module("mmkernels.ops.merge")
VARLEN = importlib.import_module("mmkernels.ops.varlen_attention")


@pytest.mark.parametrize("route", ["heuristic", "torch"])
@pytest.mark.parametrize("form", ["out-of-place", "inplace", "fused", "two-kinds"])
def test_every_merge_route_matches_the_reference(route, form):
    gen = torch.Generator().manual_seed(4)
    ids = torch.tensor([[3, 9, 9, 4, 8, 9], [9, 1, 8, 8, 2, 0]])
    embeds, table = torch.randn(2, 6, 16, generator=gen), torch.randn(12, 16, generator=gen)
    image = [torch.randn(2, 16, generator=gen), torch.randn(2, 16, generator=gen)]
    video = torch.randn(2, 16, generator=gen)
    features, ids_of = (image, 9) if form != "two-kinds" else ([image, video], [9, 8])
    if form == "two-kinds":
        ids = torch.tensor([[3, 9, 9, 4, 8, 9], [9, 1, 8, 7, 2, 0]])
    kwargs = {"embedding_weight": table} if form == "fused" else {}
    base = None if form == "fused" else embeds
    want = ops.merge_multimodal_embeddings_reference(ids, base, features, ids_of, **kwargs)
    target = embeds.clone()
    with routes.force_route("merge_multimodal_embeddings", route):  # both forms: the in-place op decides as the merge
        if form == "inplace":
            out = ops.merge_multimodal_embeddings(ids, target, features, ids_of, inplace=True)
            assert out is target
        else:
            out = ops.merge_multimodal_embeddings(ids, None if form == "fused" else target, features, ids_of, **kwargs)
    decision = backend.recent_decisions()[-1]
    assert decision.route == route and decision.op == "merge_multimodal_embeddings"  # the in-place form too
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_the_merge_index_copy_never_takes_a_sync_free_call():
    ids, embeds = torch.tensor([[1, 9, 2]]), torch.randn(1, 3, 8)
    with routes.force_route("merge_multimodal_embeddings", "torch"), pytest.raises(ValueError, match="no host sync"):
        ops.merge_multimodal_embeddings(ids, embeds, torch.randn(1, 8), 9, check=False)


@pytest.mark.parametrize("route", ["heuristic", "torch", "triton-block_m64", "triton-block_n128"])
@pytest.mark.parametrize("mask", ["none", "causal", "ranges"])
def test_every_varlen_route_matches_the_reference(route, mask):
    """Each route on ragged sequences (an empty one, GQA, a head dim of two chunks); the
    tile routes in bf16 with a sequence past 64 queries and 128 keys (where they apply:
    their tiles then cover several query and key blocks, the last ones partial)."""
    gen = torch.Generator().manual_seed(5)
    tiles = route.startswith("triton-block")
    lengths_q, lengths_k = ([5, 0, 70], [7, 3, 150]) if tiles else ([5, 0, 9], [7, 3, 9])
    cu_q = torch.tensor([0, *torch.tensor(lengths_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lengths_k).cumsum(0).tolist()], dtype=torch.int32)
    total_q, total_k = int(cu_q[-1]) + 2, int(cu_k[-1])  # 2 rows past the last sequence
    d = 40 if route == "triton-block_n128" else 24
    dtype = torch.bfloat16 if tiles else torch.float32
    q = torch.randn(total_q, 4, d, generator=gen).to(dtype)
    k, v = (torch.randn(total_k, 2, d, generator=gen).to(dtype) for _ in range(2))
    ranges = torch.randint(-2, 100, (total_q, 2), generator=gen, dtype=torch.int32) if mask == "ranges" else None
    kwargs = dict(causal=mask == "causal", kv_ranges=ranges)
    max_q, max_k = max(lengths_q), max(lengths_k)
    with routes.force_route("varlen_attention", route), poison_outputs():
        out = ops.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)
    assert backend.recent_decisions()[-1].route == route
    assert_close(out, ops.varlen_attention_reference(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs), reduction_length=max_k)
    assert not out.isnan().any()


def test_the_tile_routes_say_where_they_do_not_apply():
    cu = torch.tensor([0, 40], dtype=torch.int32)
    q = torch.randn(40, 2, 80)
    for route, why in (("triton-block_m64", "already takes 64-query tiles"), ("triton-block_n128", "128-key tiles spill")):
        with routes.force_route("varlen_attention", route), pytest.raises(ValueError, match=why):
            ops.varlen_attention(q, q, q, cu, cu, 40, 40)


def test_the_call_that_tunes_leaves_a_plan_of_what_it_ran(tables, autotune_on):
    call, _, _, _ = _linear_call()
    plans = QUANTIZED_LINEAR.OP.plans
    before = plans.replays
    call()  # tunes, then runs the winner: recorded as the plan of its key
    assert autotune_on
    call()
    assert plans.replays == before + 1
