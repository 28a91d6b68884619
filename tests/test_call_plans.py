"""Call plans (``mmkernels.backend.CallPlans``): a plain eager call whose plan key was seen
before replays the allocations and launches the first call with that key made, with its
own tensors. These tests pin what makes that safe: a replay gives bit for bit what the
ordinary path gives, writes every output element, keeps no tensor of an earlier call
alive, and anything its key does not hold (another layout, dtype, alignment, feature
offsets, autograd, a forced backend, a path that copies or syncs) takes the ordinary path.
Run in the interpreter (the direct-launch replay is covered by tests/test_launch.py's
stand-in driver and tools/host_overhead.py)."""

import gc
import importlib
import weakref

import pytest
import torch

from mmkernels import backend, ops
from mmkernels.quant import quantize

MERGE = importlib.import_module("mmkernels.ops.merge")
PLANS = {
    "merge": MERGE.OP.plans,
    "merge_inplace": MERGE.OP_INPLACE.plans,
    "patch_embed": importlib.import_module("mmkernels.ops.patch_embed").OP.plans,
    "quantized_linear": importlib.import_module("mmkernels.ops.quantized_linear").OP.plans,
    "varlen_attention": importlib.import_module("mmkernels.ops.varlen_attention").OP.plans,
}


def _merge_inputs():
    # Features as splits of one tensor (as Hugging Face models hand them over): the same
    # offsets from the first each call, so the same key.
    ids = torch.tensor([[5, 9, 9, 9, 2, 3, 9, 1], [4, 4, 9, 9, 9, 9, 7, 0]])
    return ids, torch.randn(2, 8, 40), list(torch.randn(8, 40).split([4, 4]))


def _cases():
    """(name, make_inputs, call): make_inputs() gives fresh tensors of one key each time."""
    qw = quantize(torch.randn(48, 64), "w4a16", group_size=32)
    bias = torch.randn(48)
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    return [
        ("merge", _merge_inputs, lambda ids, e, f: ops.merge_multimodal_embeddings(ids, e, f, 9, check=False)),
        ("merge", _merge_inputs, lambda ids, e, f: ops.merge_multimodal_embeddings(ids, e, f, 9)),
        ("merge", lambda: (_merge_inputs()[0], torch.randn(50, 40), [torch.randn(8, 40)]),
         lambda ids, w, f: ops.merge_multimodal_embeddings(ids, None, f, 9, embedding_weight=w, padding_idx=0)),
        ("merge_inplace", _merge_inputs,
         lambda ids, e, f: ops.merge_multimodal_embeddings(ids, e, f, 9, inplace=True).clone()),
        ("patch_embed", lambda: (torch.randn(2, 3, 12, 8), torch.randn(24, 3, 4, 4), torch.randn(6, 24)),
         lambda p, w, pos: ops.patch_embed(p, w, position_embedding=pos)),
        ("quantized_linear", lambda: (torch.randn(5, 64),),
         lambda x: ops.quantized_linear(x, qw, bias, activation="silu")),
        ("varlen_attention", lambda: tuple(torch.randn(10, 4, 16) for _ in range(3)),
         lambda q, k, v: ops.varlen_attention(q, k, v, cu, cu, 7, 7, causal=True)),
    ]


CASES = _cases()
IDS = [f"{name}-{i}" for i, (name, _, _) in enumerate(CASES)]


def _ordinary(call, inputs):
    """The same call on the ordinary path (no plan)."""
    backend.clear_call_plans()
    with backend.force_backend(backend.Backend.INTERPRETER):  # a forced scope never uses plans
        return call(*inputs)


@pytest.mark.parametrize("name,make,call", CASES, ids=IDS)
def test_a_repeated_call_replays_bit_for_bit(name, make, call):
    plans = PLANS[name]
    recorded = plans.recorded
    call(*make())  # recorded
    assert plans.recorded == recorded + 1 and len(plans) == 1
    inputs = make()
    replays = plans.replays
    with backend.poison_outputs():  # every element the replay returns was written by it
        got = call(*inputs)
    assert plans.replays == replays + 1, "the second call of one key did not replay"
    assert backend.recent_decisions()[-1].backend is backend.Backend.INTERPRETER
    want = _ordinary(call, inputs)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.equal(torch.nan_to_num(got, nan=123.0), torch.nan_to_num(want, nan=123.0))
    assert not got.isnan().any()


@pytest.mark.parametrize("name,make,call", CASES, ids=IDS)
def test_plans_keep_no_tensor_of_the_recorded_call(name, make, call):
    inputs = make()
    out = call(*inputs)
    refs = [weakref.ref(t) for t in inputs if isinstance(t, torch.Tensor)] + [weakref.ref(out)]
    del inputs, out
    gc.collect()
    assert len(PLANS[name]) == 1
    assert all(r() is None for r in refs), "a plan keeps a tensor of the call it was recorded from"


def _variants(x):
    """Tensors with the values of ``x`` that differ in what a plan key holds."""
    yield "transposed", x.t().contiguous().t() if x.dim() == 2 else x.transpose(0, 1).contiguous().transpose(0, 1)
    yield "misaligned", torch.cat([x.new_zeros(1), x.flatten()])[1:].view_as(x)
    yield "dtype", x.to(torch.float64)


def test_what_the_key_does_not_hold_takes_the_ordinary_path():
    qw = quantize(torch.randn(48, 64), "w8a16")
    plans = PLANS["quantized_linear"]
    x = torch.randn(6, 64)
    ops.quantized_linear(x, qw)
    for what, other in _variants(torch.randn(6, 64)):
        replays = plans.replays
        got = ops.quantized_linear(other, qw)
        assert plans.replays == replays, what
        backend.clear_call_plans()
        assert torch.equal(got, ops.quantized_linear(other, qw)), what
        ops.quantized_linear(x, qw)  # record the first key again
    replays = plans.replays
    ops.quantized_linear(torch.randn(7, 64), qw)  # another shape
    ops.quantized_linear(x, qw, activation="gelu")  # another scalar
    with backend.force_backend(backend.Backend.REFERENCE):
        ops.quantized_linear(x, qw)
        assert backend.recent_decisions()[-1].backend is backend.Backend.REFERENCE
    ops.quantized_linear(x.clone().requires_grad_(), qw)  # autograd records: the dispatcher
    assert plans.replays == replays
    ops.quantized_linear(torch.randn(6, 64), qw)
    assert plans.replays == replays + 1


def test_scalars_of_another_type_do_not_share_a_key():
    assert backend.plan_key((1,)) != backend.plan_key((True,)) != backend.plan_key((1.0,))
    assert backend.plan_key((torch.zeros(2, requires_grad=True),)) is None
    with torch.no_grad():
        assert backend.plan_key((torch.zeros(2, requires_grad=True),)) is not None
    assert backend.plan_key((torch.empty(2, device="meta"),)) is None
    assert backend.plan_key((object(),)) is None


def test_merge_feature_offsets_are_part_of_the_key():
    """The segment table the plan keeps holds each feature's offset from the first."""
    plans = PLANS["merge"]
    ids, embeds, _ = _merge_inputs()
    pool = torch.randn(20, 40)
    ops.merge_multimodal_embeddings(ids, embeds, [pool[0:4], pool[4:8]], 9, check=False)
    replays = plans.replays
    # Same shapes, another gap between the two features: a miss, and the right rows.
    feats = [pool[0:4], pool[10:14]]
    got = ops.merge_multimodal_embeddings(ids, embeds, feats, 9, check=False)
    assert plans.replays == replays
    assert torch.equal(got, ops.merge_multimodal_embeddings_reference(ids, embeds, feats, 9, check=False))
    # Same gap in another buffer: a replay, and the right rows.
    other = torch.randn(20, 40)
    feats = [other[0:4], other[4:8]]
    got = ops.merge_multimodal_embeddings(ids, embeds, feats, 9, check=False)
    assert plans.replays == replays + 1
    assert torch.equal(got, ops.merge_multimodal_embeddings_reference(ids, embeds, feats, 9, check=False))


def test_lists_of_tensors_are_keyed_in_c_on_this_torch():
    """The guarded description of a tensor list (``backend._tensor_list_key``) rests on
    torch's private ``torch._C._dynamo.guards.TensorGuards``: fail loudly, naming the
    version, if a torch this project supports moves it (the Python description would
    silently take over at 0.6 us a tensor)."""
    assert backend._TENSOR_GUARDS is not None, f"torch {torch.__version__}: TensorGuards is gone"
    feats = list(torch.randn(12, 8).split(2))
    key = backend._sequence_key(feats, False)
    assert key is not None and backend._TENSOR_DATA_PTR is torch._C.TensorBase.data_ptr
    assert isinstance(key, int), f"torch {torch.__version__}: a list of 6 tensors took the Python description"
    # Top-level tensors too: the key holds a guard's number, not the tensors' facts.
    key = backend.plan_key((torch.randn(3, 4), 7, torch.randn(4)))
    assert key is not None and isinstance(key[1], int) and len(key) == 4, key  # (types, guard, 7, device)


def test_top_level_tensors_in_the_key():
    """Every fact of every top-level tensor a plan depends on changes the key (or leaves
    none); the same facts in new tensors give the same key."""
    def inputs():
        return (torch.randn(6, 8), torch.randn(8, 3), 2)

    key = backend.plan_key(inputs())
    assert backend.plan_key(inputs()) == key
    x, w, n = inputs()
    for what, other in _variants(w):
        assert backend.plan_key((x, other, n)) not in (None, key), what
    assert backend.plan_key((x, w, 3)) != key  # a scalar
    assert backend.plan_key((x, x.view(8, 6)[:, :3], n)) not in (None, key)  # a view of the other input
    assert backend.plan_key((x, w.clone().requires_grad_(), n)) is None  # autograd records: the dispatcher
    with torch.no_grad():
        assert backend.plan_key((x, w.clone().requires_grad_(), n)) not in (None, key)
    assert backend.plan_key((x, torch.nn.Parameter(w.clone()), n)) is None
    sub = type("Sub", (torch.Tensor,), {})
    assert backend.plan_key((x, w.as_subclass(sub), n)) is None
    # One tensor at two inputs is told apart from two equal tensors.
    sq = torch.randn(8, 8)
    assert backend.plan_key((sq, sq, n)) not in (None, backend.plan_key((sq, sq.clone(), n)))


def _list_variants(feats: list[torch.Tensor]):
    """(what, list): ``feats`` with its last tensor changed in one fact a key must hold."""
    last = feats[-1]
    yield "dtype", [*feats[:-1], last.double()]
    yield "rows", [*feats[:-1], last[:1]]
    yield "columns", [*feats[:-1], last[:, :4]]
    yield "strides", [*feats[:-1], last.t().contiguous().t()]
    yield "rank", [*feats[:-1], last[None]]
    yield "offset", [*feats[:-1], torch.cat([feats[0], last])[2:]]
    yield "device", [*feats[:-1], torch.empty_like(last, device="meta")]
    yield "one more", [*feats, last.clone()]


@pytest.mark.parametrize("count", [2, 6], ids=["python", "guarded"])
def test_a_tensor_list_key_holds_every_fact_of_every_tensor(count):
    """Both descriptions of a list (in Python below ``_GUARDED_LIST_LENGTH`` tensors, in
    C from it): the same facts in new tensors give the same key; any fact of any tensor
    changed gives another key (or none)."""
    def fresh():
        return list(torch.randn(2 * count, 8).split(2))

    feats = fresh()
    key = backend._sequence_key(feats, False)
    assert key is not None
    assert backend._sequence_key(fresh(), False) == key
    assert backend._sequence_key(tuple(fresh()), False) == key
    for what, other in _list_variants(feats):
        other_key = backend._sequence_key(other, False)
        assert other_key != key, what
        assert backend._sequence_key(other, False) == other_key, what  # and stable
    assert backend._sequence_key(feats, False) == key  # the first guard still matches
    # Autograd: a tensor that requires grad has no key under grad mode; another without it.
    grads = [*feats[:-1], feats[-1].clone().requires_grad_()]
    assert backend._sequence_key(grads, True) is None
    assert backend._sequence_key(grads, False) not in (None, key)
    assert backend._sequence_key(feats, True) == key
    # Items a key cannot hold: a subclass, an object; a scalar is described by value.
    sub = type("Sub", (torch.Tensor,), {})
    assert backend._sequence_key([*feats[:-1], feats[-1].as_subclass(sub)], False) is None
    assert backend._sequence_key([*feats, object()], False) is None
    mixed = backend._sequence_key([*feats, 3], False)
    assert mixed is not None and mixed != backend._sequence_key([*feats, 4], False)
    # One tensor twice: the guarded description refuses it (the plan could not tell the two apart).
    if count >= backend._GUARDED_LIST_LENGTH:
        assert backend._sequence_key([*feats, feats[0]], False) is None
    # A Parameter stands in the list as a tensor does.
    assert backend._sequence_key([*feats[:-1], torch.nn.Parameter(feats[-1], requires_grad=False)], False) is not None


def test_a_replay_after_the_guard_table_was_cleared_records_again(monkeypatch):
    """Offsets beyond the table's limit clear it: a list seen before then gets a new
    number, so a new plan, and the right rows."""
    monkeypatch.setattr(backend, "_GUARDED_LIMIT", 2)
    ids = torch.full((1, 12), 9)
    embeds = torch.randn(1, 12, 8)
    pool = torch.randn(40, 8)
    layouts = [[pool[i : i + 4], pool[i + 4 + g : i + 8 + g], pool[i + 8 + 2 * g : i + 12 + 2 * g]]
               for i, g in ((0, 0), (1, 2), (3, 1), (0, 0))]  # fmt: skip
    for feats in layouts:
        got = ops.merge_multimodal_embeddings(ids, embeds, feats, 9, check=False)
        assert torch.equal(got, ops.merge_multimodal_embeddings_reference(ids, embeds, feats, 9, check=False))
    assert len(backend._GUARDED) <= 2


def test_merge_check_still_raises_on_a_replay():
    ids, embeds, feats = _merge_inputs()
    plans = PLANS["merge"]
    ops.merge_multimodal_embeddings(ids, embeds, feats, 9)
    bad = ids.clone()
    bad[0, 0] = 9  # one placeholder more than feature rows: same key
    replays = plans.replays
    with pytest.raises(ops.PlaceholderCountError, match="9 placeholder tokens"):
        ops.merge_multimodal_embeddings(bad, embeds, feats, 9)
    assert plans.replays == replays + 1


def test_paths_that_copy_are_never_planned():
    ids, embeds, feats = _merge_inputs()
    strided = [f.t().contiguous().t() for f in feats]  # column stride != 1: copied into the table
    ops.merge_multimodal_embeddings(ids, embeds, strided, 9, check=False)
    assert len(PLANS["merge"]) == 0
    # An in-place merge into a layout the kernel cannot write through: merged, then copied back.
    e = torch.randn(2, 40, 8).transpose(1, 2)
    ops.merge_multimodal_embeddings(ids, e, feats, 9, check=False, inplace=True)
    assert len(PLANS["merge_inplace"]) == 0
    # A non-contiguous Linear bias is copied first.
    qw = quantize(torch.randn(48, 64), "w8a16")
    ops.quantized_linear(torch.randn(3, 64), qw, torch.randn(96)[::2])
    assert len(PLANS["quantized_linear"]) == 0


def test_plans_are_dropped_with_the_decisions_and_can_be_switched_off(monkeypatch):
    x = torch.randn(4, 64)
    qw = quantize(torch.randn(48, 64), "w8a16")
    ops.quantized_linear(x, qw)
    assert len(PLANS["quantized_linear"]) == 1
    backend.clear_decision_cache()
    assert len(PLANS["quantized_linear"]) == 0
    monkeypatch.setenv("MMKERNELS_CALL_PLANS", "0")
    backend.refresh_environment()
    try:
        ops.quantized_linear(x, qw)
        ops.quantized_linear(x, qw)
        assert len(PLANS["quantized_linear"]) == 0
    finally:
        monkeypatch.delenv("MMKERNELS_CALL_PLANS")
        backend.refresh_environment()
    ops.quantized_linear(x, qw)
    assert len(PLANS["quantized_linear"]) == 1


def test_one_tensor_at_two_inputs_never_stands_for_two():
    """q is k is v (and cu_seqlens_q is cu_seqlens_k) in one call, distinct tensors of the
    same key in the next: the plan of one must not give the other's result."""
    plans = PLANS["varlen_attention"]
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    q = torch.randn(10, 4, 16)
    ops.varlen_attention(q, q, q, cu, cu, 7, 7)  # recorded with aliases
    q2, k2, v2 = (torch.randn(10, 4, 16) for _ in range(3))
    cu_k = cu.clone()
    replays = plans.replays
    got = ops.varlen_attention(q2, k2, v2, cu, cu_k, 7, 7)
    assert plans.replays == replays  # another alias pattern: another key
    want = ops.varlen_attention_reference(q2, k2, v2, cu, cu_k, 7, 7)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    ops.varlen_attention(q2, q2, q2, cu, cu, 7, 7)  # the aliased key again: its plan, and right
    assert plans.replays == replays + 1
    torch.testing.assert_close(ops.varlen_attention(k2, k2, k2, cu, cu, 7, 7),
                               ops.varlen_attention_reference(k2, k2, k2, cu, cu, 7, 7), rtol=1e-5, atol=1e-5)
    # One tensor both in a list and at the top (the features are inputs_embeds): no plan.
    ids = torch.full((8,), 9)
    e = torch.randn(8, 40)
    before = len(PLANS["merge"])
    got = ops.merge_multimodal_embeddings(ids, e, [e], 9, check=False)
    assert len(PLANS["merge"]) == before
    assert torch.equal(got, ops.merge_multimodal_embeddings_reference(ids, e, [e], 9, check=False))


def _layout(t: torch.Tensor, how: str) -> torch.Tensor:
    """``t``'s values in another memory layout: the things a plan key tells apart."""
    if how == "contiguous":
        return t
    if how == "offset":  # one element off the allocation's start: another alignment
        return torch.cat([t.new_zeros(1), t.flatten()])[1:].view_as(t)
    if how == "padded":  # rows of a wider buffer
        wide = t.new_zeros(*t.shape[:-1], t.shape[-1] + 8)
        wide[..., : t.shape[-1]] = t
        return wide[..., : t.shape[-1]]
    raise ValueError(how)


def _random_call(rng, data):
    """One op call (name, inputs, call) drawn from ``rng`` (the structure: shapes, dtypes,
    layouts, aliasing) with values from ``data`` (so the same structure can be drawn again
    with other values: the same plan key)."""
    op = rng.choice(["merge", "patch_embed", "quantized_linear", "varlen_attention"])
    dtype = rng.choice([torch.float32, torch.bfloat16])
    how = rng.choice(["contiguous", "offset", "padded"])

    def randn(*shape):
        return torch.randn(*shape, generator=data).to(dtype)

    if op == "merge":
        t, d, n_img = rng.choice([10, 13]), rng.choice([8, 24]), rng.choice([1, 2, 4])  # 4: a guarded list key
        ids = torch.arange(t) % 5 + 10
        rows = 2 * n_img
        ids[1 : 1 + rows] = 3
        feats = list(_layout(randn(rows, d), how).split(2)) if rng.random() < 0.5 else [randn(2, d) for _ in range(n_img)]
        embeds = _layout(randn(1, t, d), how)
        inplace = rng.random() < 0.3
        check = rng.random() < 0.5

        def call(ids, embeds, *feats):
            out = ops.merge_multimodal_embeddings(ids, embeds.clone() if inplace else embeds, list(feats), 3,
                                                  check=check, inplace=inplace)  # fmt: skip
            return out

        return op, (ids[None], embeds, *feats), call
    if op == "patch_embed":
        pixels = _layout(randn(rng.choice([1, 2]), 3, 8, 12), how)
        weight = randn(16, 3, 4, 4)
        pos = randn(6, 16) if rng.random() < 0.5 else None
        return op, (pixels, weight, pos), lambda p, w, pos: ops.patch_embed(p, w, position_embedding=pos)
    if op == "quantized_linear":
        scheme = rng.choice(["w8a16", "w4a16"])
        qw = quantize(torch.randn(24, 64, generator=data), scheme, group_size=32)
        x = _layout(randn(rng.choice([3, 17]), 64), how)
        act = rng.choice([None, "gelu"])
        return op, (x,), lambda x: ops.quantized_linear(x, qw, activation=act)
    lengths = [rng.choice([1, 5, 9]) for _ in range(rng.choice([1, 3]))]
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q = _layout(randn(total, 2, 16), how)
    alias = rng.random() < 0.4
    k = q if alias else randn(total, 2, 16)
    v = q if alias else randn(total, 2, 16)
    causal = rng.random() < 0.5
    return op, (q, k, v), lambda q, k, v: ops.varlen_attention(q, k, v, cu, cu, max(lengths), max(lengths),
                                                               causal=causal)  # fmt: skip


def test_random_calls_replay_what_the_ordinary_path_computes():
    """Drawn structures (ops, dtypes, alignments, padded rows, split or separate features,
    in place, checks, aliasing), each called three times with new values: every result
    equals the ordinary path's on the same inputs, bit for bit."""
    import random

    rng = random.Random(1234)
    replays = sum(p.replays for p in PLANS.values())
    for case in range(24):
        state = rng.getstate()
        for attempt in range(3):
            rng.setstate(state)  # the same structure again, new values
            data = torch.Generator().manual_seed(case * 10 + attempt)
            name, inputs, call = _random_call(rng, data)
            got = call(*inputs)
            with backend.force_backend(backend.Backend.INTERPRETER):
                want = call(*inputs)
            assert torch.equal(torch.nan_to_num(got, nan=7.0), torch.nan_to_num(want, nan=7.0)), (case, attempt, name)
    assert sum(p.replays for p in PLANS.values()) - replays >= 24, "repeated structures should replay"
