"""The multimodal token merge: Triton kernel (interpreter) against its reference, the
reference against an independent loop, bad inputs, host syncs, torch.compile."""

from __future__ import annotations

import pytest
import torch

from mmkernels.backend import Backend, force_backend, recent_decisions
from mmkernels.ops import merge_multimodal_embeddings as merge
from mmkernels.ops import merge_multimodal_embeddings_reference as reference
from mmkernels.ops.merge import PlaceholderCountError
from mmkernels.testing import (
    HostSyncCounter,
    assert_bitwise_equal,
    assert_deterministic,
    nan_padded,
    poison_outputs,
)

IMAGE, VIDEO, AUDIO = 90, 91, 92
VOCAB = 89  # text ids are drawn from [0, VOCAB)


def make_ids(batch_lengths, segments, *, seed=0, flat=False, dtype=torch.int64):
    """ids with placeholder runs: segments[b] is a list of (start, length, id) for row b."""
    g = torch.Generator().manual_seed(seed)
    seq = max(batch_lengths)
    ids = torch.randint(0, VOCAB, (len(batch_lengths), seq), generator=g)
    for b, runs in enumerate(segments):
        for start, length, pid in runs:
            ids[b, start : start + length] = pid
    ids = ids.to(dtype)
    return ids.reshape(-1) if flat else ids


def loop_merge(ids, embeds, features_by_id):
    """Independent definition: walk positions in order, hand out feature rows."""
    flat_ids = ids.reshape(-1).tolist()
    out = embeds.reshape(len(flat_ids), -1).clone()
    cursor = {pid: 0 for pid in features_by_id}
    for t, tok in enumerate(flat_ids):
        if tok in features_by_id:
            out[t] = features_by_id[tok][cursor[tok]].to(out.dtype)
            cursor[tok] += 1
    return out.reshape(embeds.shape)


def run_kernel(*args, **kwargs):
    with poison_outputs():
        out = merge(*args, **kwargs)
    decision = recent_decisions()[-1]
    assert decision.backend is Backend.INTERPRETER, decision
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("dim", [64, 1152, 4096])
def test_many_images_of_different_lengths(dtype, dim):
    # three images of 7, 1 and 13 tokens; text before, between and after; batch of 2.
    ids = make_ids([37, 37], [[(2, 7, IMAGE), (12, 1, IMAGE)], [(20, 13, IMAGE)]])
    embeds = torch.randn(2, 37, dim, dtype=torch.float64).to(dtype)
    feats = [torch.randn(n, dim, dtype=torch.float64).to(dtype) for n in (7, 1, 13)]
    out = run_kernel(ids, embeds, feats, IMAGE)
    ref = reference(ids, embeds, feats, IMAGE)
    assert_bitwise_equal(out, ref)
    assert_bitwise_equal(ref, loop_merge(ids, embeds, {IMAGE: torch.cat(feats)}))
    assert not out.isnan().any()


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_ids_layouts_and_one_tensor_of_features(flat, id_dtype):
    ids = make_ids([129], [[(0, 1, IMAGE), (5, 63, IMAGE), (128, 1, IMAGE)]], flat=flat, dtype=id_dtype)
    embeds = torch.randn(*ids.shape, 96)
    feats = torch.randn(65, 96)
    out = run_kernel(ids, embeds, feats, IMAGE)
    assert out.shape == embeds.shape
    assert_bitwise_equal(out, loop_merge(ids, embeds, {IMAGE: feats}))


@pytest.mark.parametrize("case", ["zero-images", "one-image", "all-placeholders", "one-token"])
def test_edge_counts(case):
    runs, length, n = {
        "zero-images": ([], 7, 0),
        "one-image": ([(3, 577 - 10, IMAGE)], 577, 567),
        "all-placeholders": ([(0, 9, IMAGE)], 9, 9),
        "one-token": ([], 1, 0),
    }[case]
    ids = make_ids([length], [runs])
    embeds = torch.randn(1, length, 64)
    feats = torch.randn(n, 64)
    out = run_kernel(ids, embeds, feats, IMAGE)
    assert_bitwise_equal(out, loop_merge(ids, embeds, {IMAGE: feats}))


def test_fused_lookup_matches_embedding_then_merge():
    ids = make_ids([41, 41], [[(4, 9, IMAGE)], [(0, 2, IMAGE), (30, 11, IMAGE)]])
    table = torch.randn(VOCAB, 72, dtype=torch.bfloat16)
    feats = [torch.randn(9, 72, dtype=torch.bfloat16), torch.randn(13, 72, dtype=torch.bfloat16)]
    out = run_kernel(ids, None, feats, IMAGE, embedding_weight=table)
    unfused = torch.nn.functional.embedding(ids.clamp(max=VOCAB - 1), table)
    assert_bitwise_equal(out, loop_merge(ids, unfused, {IMAGE: torch.cat(feats)}))
    assert_bitwise_equal(out, reference(ids, None, feats, IMAGE, embedding_weight=table))


def test_several_placeholder_kinds_in_one_call():
    # Qwen2-VL style: two images, one video; Qwen2-Audio style audio too.
    ids = make_ids(
        [50, 50],
        [[(1, 5, IMAGE), (8, 12, VIDEO), (30, 3, AUDIO)], [(0, 4, IMAGE), (10, 6, VIDEO), (40, 7, AUDIO)]],
    )
    embeds = torch.randn(2, 50, 64, dtype=torch.float16)
    image = [torch.randn(5, 64, dtype=torch.float16), torch.randn(4, 64, dtype=torch.float16)]
    video = torch.randn(18, 64, dtype=torch.float16)
    audio = [torch.randn(3, 64, dtype=torch.float16), torch.randn(7, 64, dtype=torch.float16)]
    out = run_kernel(ids, embeds, [image, video, audio], [IMAGE, VIDEO, AUDIO])
    expected = loop_merge(ids, embeds, {IMAGE: torch.cat(image), VIDEO: video, AUDIO: torch.cat(audio)})
    assert_bitwise_equal(out, expected)
    assert_bitwise_equal(out, reference(ids, embeds, [image, video, audio], [IMAGE, VIDEO, AUDIO]))


def test_nan_padded_strided_inputs_never_read_out_of_bounds():
    ids = make_ids([23, 23], [[(2, 6, IMAGE)], [(10, 9, IMAGE)]])
    embeds = nan_padded(torch.randn(2, 23, 80))
    feats = [nan_padded(torch.randn(6, 80)), nan_padded(torch.randn(9, 80), rows_before=1, extra_cols=3)]
    assert embeds.stride(-2) != 80 and feats[0].stride(0) != 80
    out = run_kernel(ids, embeds, feats, IMAGE)
    assert not out.isnan().any()
    assert_bitwise_equal(out, loop_merge(ids, embeds, {IMAGE: torch.cat(feats)}))
    table = nan_padded(torch.randn(VOCAB, 80))
    out = run_kernel(ids, None, feats, IMAGE, embedding_weight=table)
    assert not out.isnan().any()


def test_features_cast_to_output_dtype_in_the_kernel():
    ids = make_ids([30], [[(3, 10, IMAGE)]])
    embeds = torch.randn(1, 30, 64, dtype=torch.bfloat16)
    feats = torch.randn(10, 64, dtype=torch.float32)
    out = run_kernel(ids, embeds, feats, IMAGE)
    ref = reference(ids, embeds, feats, IMAGE)
    text = ids[0] != IMAGE
    assert_bitwise_equal(out[0, text], ref[0, text])
    # The interpreter rounds fp32 -> bf16 toward zero (a GPU rounds to nearest): one ulp.
    torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=0)


def test_deterministic():
    ids = make_ids([40, 40], [[(1, 17, IMAGE)], [(5, 20, IMAGE)]])
    embeds, feats = torch.randn(2, 40, 64), torch.randn(37, 64)
    assert_deterministic(lambda: run_kernel(ids, embeds, feats, IMAGE))


@pytest.mark.parametrize("features_given", [5, 12])
def test_unchecked_mismatch_is_visible_and_in_bounds(features_given):
    ids = make_ids([20], [[(2, 8, IMAGE)]])
    embeds = torch.randn(1, 20, 64)
    feats = nan_padded(torch.randn(features_given, 64), rows_after=0)
    out = run_kernel(ids, embeds, feats, IMAGE, check=False)
    assert_bitwise_equal(out, reference(ids, embeds, feats, IMAGE, check=False))
    placeholder_rows = out[0, 2:10]
    filled = min(features_given, 8)
    assert not placeholder_rows[:filled].isnan().any()
    assert placeholder_rows[filled:].isnan().all()
    assert not out[0, 10:].isnan().any()


def test_unchecked_out_of_table_ids_are_nan():
    ids = make_ids([12], [[(2, 3, IMAGE)]])
    ids[0, 7] = VOCAB + 5
    ids[0, 8] = -3
    table, feats = torch.randn(VOCAB, 64), torch.randn(3, 64)
    out = run_kernel(ids, None, feats, IMAGE, embedding_weight=table, check=False)
    assert out[0, 7:9].isnan().all() and not out[0, :7].isnan().any()
    assert_bitwise_equal(out, reference(ids, None, feats, IMAGE, embedding_weight=table, check=False))
    with pytest.raises(ValueError, match=r"input_ids: 2 text token ids outside the embedding table \[0, 89\)"):
        merge(ids, None, feats, IMAGE, embedding_weight=table)


@pytest.mark.parametrize("fn", [merge, reference], ids=["op", "reference"])
@pytest.mark.parametrize("given,expected", [(7, 8), (9, 8)])
def test_count_mismatch_raises_with_both_counts(fn, given, expected):
    ids = make_ids([20], [[(2, expected, IMAGE)]])
    message = rf"{expected} placeholder tokens in input_ids but {given} feature rows"
    with pytest.raises(ValueError, match=message) as info:
        fn(ids, torch.randn(1, 20, 64), torch.randn(given, 64), IMAGE)
    # The counts travel with the error (integrations restate it in their framework's words).
    assert isinstance(info.value, PlaceholderCountError)
    assert (info.value.kind_ids, info.value.placeholders, info.value.rows) == ([IMAGE], [expected], [given])


def test_host_syncs_one_with_check_zero_without():
    ids = make_ids([40], [[(3, 20, IMAGE)]])
    embeds, feats = torch.randn(1, 40, 64), torch.randn(20, 64)
    with HostSyncCounter() as checked:
        merge(ids, embeds, feats, IMAGE, check=True)
    with HostSyncCounter() as unchecked:
        merge(ids, embeds, feats, IMAGE, check=False)
    with HostSyncCounter() as hf_style:
        mask = ids == IMAGE
        assert int(mask.sum()) == feats.shape[0]
        embeds.masked_scatter(mask.unsqueeze(-1), feats)
    assert checked.count == 1, checked
    assert unchecked.count == 0, unchecked
    assert hf_style.count >= 1, hf_style


BAD_INPUTS = [
    ("ids dtype", dict(input_ids=torch.zeros(1, 4, dtype=torch.float32)), TypeError, "input_ids: expected dtype int32 or int64"),
    ("ids dims", dict(input_ids=torch.zeros(1, 1, 4, dtype=torch.long)), ValueError, r"input_ids: expected shape \(B, S\) or \(T,\)"),
    ("embeds shape", dict(inputs_embeds=torch.zeros(1, 5, 8)), ValueError, "inputs_embeds: expected shape"),
    ("embeds dtype", dict(inputs_embeds=torch.zeros(1, 4, 8, dtype=torch.int32)), TypeError, "inputs_embeds: expected a floating dtype"),
    ("feature dim", dict(features=torch.zeros(2, 9)), ValueError, r"features: expected shape \(n, 8\)"),
    ("feature 3d", dict(features=torch.zeros(1, 2, 8)), ValueError, r"reshape\(-1, D\)"),
    ("feature dtype", dict(features=torch.zeros(2, 8, dtype=torch.int64)), TypeError, "features: expected a floating dtype"),
    ("mixed feature dtypes", dict(features=[torch.zeros(1, 8), torch.zeros(1, 8, dtype=torch.float16)]), TypeError, "share one dtype"),
    ("feature device", dict(features=torch.zeros(2, 8, device="meta")), ValueError, "features: expected device cpu"),
    ("feature type", dict(features="no"), TypeError, "features: expected a Tensor or a list"),
    ("no embeddings", dict(inputs_embeds=None), ValueError, "pass inputs_embeds or embedding_weight"),
    ("both embeddings", dict(embedding_weight=torch.zeros(10, 8)), ValueError, "not both"),
    ("kinds vs features", dict(placeholder_id=[IMAGE, VIDEO]), ValueError, "expected a sequence of 2 entries"),
    ("duplicate ids", dict(placeholder_id=[IMAGE, IMAGE], features=[torch.zeros(2, 8), torch.zeros(0, 8)]), ValueError, "distinct"),
    ("id type", dict(placeholder_id=1.5), TypeError, "placeholder_id: expected an int"),
]


@pytest.mark.parametrize("fn", [merge, reference], ids=["op", "reference"])
@pytest.mark.parametrize("name,override,error,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_name_the_argument(fn, name, override, error, message):
    args = dict(
        input_ids=torch.tensor([[1, IMAGE, IMAGE, 2]]),
        inputs_embeds=torch.zeros(1, 4, 8),
        features=torch.zeros(2, 8),
        placeholder_id=IMAGE,
    )
    args.update(override)
    weight = args.pop("embedding_weight", None)
    with pytest.raises(error, match=message):
        fn(args["input_ids"], args["inputs_embeds"], args["features"], args["placeholder_id"], embedding_weight=weight)


def test_reference_backend_when_forced_and_reasons_recorded():
    ids = make_ids([10], [[(1, 2, IMAGE)]])
    embeds, feats = torch.randn(1, 10, 64), torch.randn(2, 64)
    with force_backend(Backend.REFERENCE):
        out = merge(ids, embeds, feats, IMAGE)
    decision = recent_decisions()[-1]
    assert decision.backend is Backend.REFERENCE and "forced" in str(decision)
    assert_bitwise_equal(out, loop_merge(ids, embeds, {IMAGE: feats}))


def test_torch_compile_fullgraph():
    ids = make_ids([30], [[(3, 10, IMAGE)]])
    table, feats = torch.randn(VOCAB, 64), torch.randn(10, 64)

    def f(ids, table, feats):
        return merge(ids, None, [feats[:4], feats[4:]], IMAGE, embedding_weight=table, check=False) * 2

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    assert_bitwise_equal(compiled(ids, table, feats), f(ids, table, feats))
    assert torch.ops.mmkernels.merge_multimodal_embeddings.default is not None


@pytest.mark.parametrize("fused", [False, True])
def test_gradients_match_reference_autograd(fused):
    ids = make_ids([21, 21], [[(2, 5, IMAGE), (9, 3, VIDEO)], [(0, 4, IMAGE)]])
    image = [torch.randn(5, 16, dtype=torch.float64, requires_grad=True), torch.randn(4, 16, dtype=torch.float64, requires_grad=True)]
    video = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    base = torch.randn(VOCAB if fused else 42, 16, dtype=torch.float64)
    base = (base if fused else base.reshape(2, 21, 16)).requires_grad_(True)
    upstream = torch.randn(2, 21, 16, dtype=torch.float64)

    def grads(fn):
        kwargs = dict(embedding_weight=base) if fused else {}
        out = fn(ids, None if fused else base, [image, video], [IMAGE, VIDEO], **kwargs)
        return torch.autograd.grad((out * upstream).sum(), [base, *image, video])

    for got, want in zip(grads(merge), grads(reference)):
        assert_bitwise_equal(got, want, name="gradient")


def test_image_count_does_not_change_the_compiled_variant():
    """Serving sees a new image count every batch: it must not mean a new compile."""
    from mmkernels.ops.merge import _build_launch, _validate

    def meta(images):
        ids = make_ids([200], [[(i * 20, 5, IMAGE) for i in range(images)]])
        feats = [torch.randn(5, 64) for _ in range(images)]
        args = _validate(ids, torch.randn(1, 200, 64), feats, IMAGE, None)
        launch, _ = _build_launch(args, torch.empty(200, 64))
        return launch.rows_meta

    assert meta(5) == meta(7) == meta(8)
    assert meta(2) != meta(9)  # bucketed search depth: a handful of variants in all


def test_empty_feature_tensors_among_real_ones():
    """An image with no tokens (an empty tensor, whose data pointer may be null) first,
    between and last, with several kinds; fused and not."""
    ids = make_ids([30], [[(2, 4, IMAGE), (10, 3, VIDEO), (20, 5, IMAGE)]])
    image = [torch.empty(0, 64), torch.randn(4, 64), torch.empty(0, 64), torch.randn(5, 64)]
    video = [torch.randn(3, 64), torch.empty(0, 64)]
    embeds, table = torch.randn(1, 30, 64), torch.randn(VOCAB, 64)
    expected = loop_merge(ids, embeds, {IMAGE: torch.cat(image), VIDEO: torch.cat(video)})
    assert_bitwise_equal(run_kernel(ids, embeds, [image, video], [IMAGE, VIDEO]), expected)
    fused = run_kernel(ids, None, [image, video], [IMAGE, VIDEO], embedding_weight=table)
    assert_bitwise_equal(fused, reference(ids, None, [image, video], [IMAGE, VIDEO], embedding_weight=table))


# --------------------------------------------------------------------------------------
# In place (inplace=True): only placeholder rows written into the caller's inputs_embeds


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_writes_placeholder_rows_into_inputs_embeds(dtype):
    ids = make_ids([40, 40], [[(3, 7, IMAGE), (20, 2, VIDEO)], [(0, 5, IMAGE)]])
    image, video = [torch.randn(7, 64, dtype=dtype), torch.randn(5, 64, dtype=dtype)], torch.randn(2, 64, dtype=dtype)
    embeds = torch.randn(2, 40, 64, dtype=dtype)
    want = reference(ids, embeds, [image, video], [IMAGE, VIDEO])
    target = embeds.clone()
    got = merge(ids, target, [image, video], [IMAGE, VIDEO], inplace=True)
    assert recent_decisions()[-1].backend is Backend.INTERPRETER
    assert got is target
    assert_bitwise_equal(target, want)


def test_inplace_never_touches_text_rows():
    """Text rows are neither read nor written: NaN text rows stay NaN bit for bit, and a
    second run gives the same bits."""
    ids = make_ids([30], [[(4, 6, IMAGE)]])
    feats = torch.randn(6, 64)
    target = torch.full((1, 30, 64), float("nan"))
    merge(ids, target, feats, IMAGE, inplace=True)
    is_image = (ids == IMAGE)[0]
    assert target[0, ~is_image].isnan().all()
    assert_bitwise_equal(target[0, is_image], feats)
    again = target.clone()
    merge(ids, again, feats, IMAGE, inplace=True)
    assert_bitwise_equal(again, target)


def test_inplace_count_mismatch_raises_before_writing_and_check_false_writes_nan():
    ids = make_ids([20], [[(2, 5, IMAGE)]])
    embeds = torch.randn(1, 20, 16)
    target = embeds.clone()
    with pytest.raises(PlaceholderCountError):
        merge(ids, target, torch.randn(4, 16), IMAGE, inplace=True)
    assert_bitwise_equal(target, embeds)  # nothing written
    feats = torch.randn(4, 16)
    merge(ids, target, feats, IMAGE, inplace=True, check=False)
    assert_bitwise_equal(target, reference(ids, embeds, feats, IMAGE, check=False))


def test_inplace_layouts_reference_autograd_and_compile():
    ids = make_ids([12], [[(1, 3, IMAGE)]], flat=True)
    feats = torch.randn(3, 8)
    embeds = torch.randn(12, 8)
    want = reference(ids, embeds, feats, IMAGE)
    # A column-strided view cannot be written through: merged, then copied back.
    strided = torch.randn(8, 12).t()
    strided.copy_(embeds)
    assert merge(ids, strided, feats, IMAGE, inplace=True) is strided
    assert_bitwise_equal(strided, want)
    with force_backend(Backend.REFERENCE):
        target = embeds.clone()
        merge(ids, target, feats, IMAGE, inplace=True)
        assert recent_decisions()[-1].backend is Backend.REFERENCE
    assert_bitwise_equal(target, want)
    # Autograd records: copy_ of the differentiable op; placeholder rows pass no gradient.
    leaf = embeds.clone().requires_grad_(True)
    x = leaf * 1
    merge(ids, x, feats, IMAGE, inplace=True)
    x.sum().backward()
    assert_bitwise_equal(leaf.grad[:, 0], (ids != IMAGE).to(torch.float32))
    # torch.compile traces the mutating op.
    target = embeds.clone()
    torch.compile(lambda i, e, f: merge(i, e, f, IMAGE, inplace=True, check=False), fullgraph=True)(ids, target, feats)
    assert_bitwise_equal(target, want)
    with pytest.raises(ValueError, match="inplace=True"):
        merge(ids, None, feats, IMAGE, embedding_weight=torch.randn(100, 8), inplace=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("form", ["out-of-place", "inplace", "fused"])
def test_one_launch_form_writes_what_the_two_launch_form_writes(form, dtype, monkeypatch):
    """check=False up to ``_SCAN_PREFIX_MAX_TOKENS`` tokens is one launch whose programs
    count the placeholders before their block themselves: bit for bit what the count
    launch + cumsum form writes, across several scan steps (2500 tokens, 1024 ids a step),
    three kinds (one of them id 0, the value masked loads return), strided ids, surplus
    placeholders (NaN rows) and surplus feature rows."""
    import mmkernels.ops.merge as merge_module

    gen = torch.Generator().manual_seed(11)
    T, D = 2500, 8
    ids = torch.randint(5, 50, (2 * T,), generator=gen)[::2]  # strided
    kinds = [0, 3, 4]
    where = torch.randperm(T, generator=gen)
    for k, kind in enumerate(kinds):
        ids[where[k * 300 : (k + 1) * 300]] = kind
    ids[where[900:910]] = 3  # ten more kind-3 placeholders than rows: NaN rows
    rows = {0: [70, 230], 3: [300], 4: [150, 160]}  # kind 4: ten rows too many
    features = [[torch.randn(n, D, generator=gen, dtype=dtype) for n in rows[kind]] for kind in kinds]
    table = torch.randn(64, D, generator=gen, dtype=dtype)
    embeds = table[ids.clamp(0, 63)].clone()

    def run(max_tokens):
        monkeypatch.setattr(merge_module, "_SCAN_PREFIX_MAX_TOKENS", max_tokens)
        if form == "fused":
            return merge(ids, None, features, kinds, embedding_weight=table, check=False)
        target = embeds.clone()
        out = merge(ids, target, features, kinds, check=False, inplace=form == "inplace")
        return out

    launched = []
    real_launch = merge_module.backend_launch
    monkeypatch.setattr(merge_module, "backend_launch", lambda kernel, *a: launched.append(kernel.__name__) or real_launch(kernel, *a))
    one = run(4096)
    assert launched == ["merge_rows_kernel"]
    two = run(0)
    assert launched[1:] == ["merge_count_kernel", "merge_rows_kernel"]
    assert torch.equal(one.nan_to_num(7.0), two.nan_to_num(7.0))
    assert one.isnan().any(dim=-1).sum() == 10  # the surplus kind-3 placeholders
    if form == "fused":
        want = reference(ids, None, features, kinds, embedding_weight=table, check=False)
    else:
        want = reference(ids, embeds, features, kinds, check=False)
    assert torch.equal(one.nan_to_num(7.0), want.reshape(one.shape).nan_to_num(7.0))


INDICATORS = (93, 94, 95)  # Ovis2-style visual indicator ids: one learned row each


def _indicator_call(dtype=torch.float64, seed=3):
    """Images plus three broadcast kinds: one indicator twice per row, one once, one absent."""
    ids = make_ids([40, 40], [[(1, 1, 93), (2, 6, IMAGE), (8, 1, 94), (20, 1, 93)],
                              [(0, 1, 93), (5, 9, IMAGE), (15, 1, 93)]], seed=seed)  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn(2, 40, 24, generator=gen, dtype=dtype)
    image = [torch.randn(6, 24, generator=gen, dtype=dtype), torch.randn(9, 24, generator=gen, dtype=dtype)]
    vectors = torch.randn(len(INDICATORS), 24, generator=gen, dtype=dtype)
    features = [image] + [vectors[i : i + 1] for i in range(len(INDICATORS))]
    return ids, embeds, features, [IMAGE, *INDICATORS]


def _loop_with_indicators(ids, embeds, features):
    expected = loop_merge(ids, embeds, {IMAGE: torch.cat(features[0])})
    flat_ids, flat = ids.reshape(-1), expected.reshape(-1, expected.shape[-1])
    for kid, row in zip(INDICATORS, features[1:]):
        flat[flat_ids == kid] = row.to(flat.dtype)
    return expected


@pytest.mark.parametrize("check", [True, False])
@pytest.mark.parametrize("form", ["out-of-place", "inplace", "fused", "two-launch"])
def test_broadcast_kinds_give_every_placeholder_their_one_row(form, check, monkeypatch):
    """``broadcast_ids``: each placeholder of such an id takes its kind's one row (any count,
    none included), beside counted kinds; against an independent loop and the reference,
    in float64, in both launch forms (check=False is one launch here; ``two-launch`` forces
    the count launch), in place and fused."""
    import mmkernels.ops.merge as merge_module

    if form == "two-launch":
        monkeypatch.setattr(merge_module, "_SCAN_PREFIX_MAX_TOKENS", 0)
    ids, embeds, features, kinds = _indicator_call()
    if form == "fused":
        table = torch.randn(VOCAB, 24, dtype=torch.float64)
        embeds = table[ids.clamp(max=VOCAB - 1)]
        out = run_kernel(ids, None, features, kinds, embedding_weight=table, check=check, broadcast_ids=INDICATORS)
        want = reference(ids, None, features, kinds, embedding_weight=table, check=check, broadcast_ids=INDICATORS)
    else:
        target = embeds.clone()
        out = run_kernel(ids, target, features, kinds, check=check, inplace=form == "inplace", broadcast_ids=INDICATORS)
        want = reference(ids, embeds, features, kinds, check=check, broadcast_ids=INDICATORS)
        if form == "inplace":
            assert out is target
    assert_bitwise_equal(out, _loop_with_indicators(ids, embeds, features))
    assert_bitwise_equal(out, want)
    assert not out.isnan().any()


def test_broadcast_kinds_gradients_sum_over_their_placeholders():
    ids, embeds, features, kinds = _indicator_call()
    embeds.requires_grad_(True)
    leaves = [f.clone().requires_grad_(True) for f in [*features[0], *features[1:]]]
    upstream = torch.randn(2, 40, 24, dtype=torch.float64)

    def grads(fn):
        out = fn(ids, embeds, [leaves[:2], *leaves[2:]], kinds, broadcast_ids=INDICATORS)
        return torch.autograd.grad((out * upstream).sum(), [embeds, *leaves])

    got, want = grads(merge), grads(reference)
    for g, w in zip(got, want):
        assert_bitwise_equal(g, w, name="gradient")
    flat_ids, flat_up = ids.reshape(-1), upstream.reshape(-1, 24)
    assert torch.allclose(got[3], flat_up[flat_ids == 93].sum(0, keepdim=True))  # four placeholders
    assert torch.equal(got[5], torch.zeros(1, 24, dtype=torch.float64))  # id 95: none in the text


@pytest.mark.parametrize("fn", [merge, reference], ids=["op", "reference"])
def test_broadcast_kinds_keep_the_other_kinds_checked(fn):
    ids, embeds, features, kinds = _indicator_call()
    short = [[features[0][0], features[0][1][:8]], *features[1:]]
    with pytest.raises(PlaceholderCountError) as err:
        fn(ids, embeds, short, kinds, broadcast_ids=INDICATORS)
    assert (err.value.placeholders, err.value.rows) == ([15, 4, 1, 0], [14, 4, 1, 0])
    assert str(err.value) == f"features: count mismatch: placeholder id {IMAGE}: 15 placeholder tokens in input_ids but 14 feature rows"


@pytest.mark.parametrize("fn", [merge, reference], ids=["op", "reference"])
@pytest.mark.parametrize("broadcast_ids,features_of_94,error,message", [
    ([96], None, ValueError, "broadcast_ids[0]: 96 is not one of placeholder_id"),
    ([93, 93], None, ValueError, "broadcast_ids: ids must be distinct"),
    (93, None, TypeError, "broadcast_ids: expected a sequence of ints, got int"),
    ([93.0], None, TypeError, "broadcast_ids[0]: expected an int, got float"),
    ([94], 2, ValueError, "features[2]: placeholder id 94 is in broadcast_ids, so its features must be one row"),
    ([94], 0, ValueError, "features[2]: placeholder id 94 is in broadcast_ids, so its features must be one row"),
])  # fmt: skip
def test_broadcast_ids_bad_inputs_name_the_argument(fn, broadcast_ids, features_of_94, error, message):
    ids, embeds, features, kinds = _indicator_call()
    if features_of_94 is not None:
        features[2] = torch.randn(features_of_94, 24, dtype=torch.float64)
    with pytest.raises(error) as err:
        fn(ids, embeds, features, kinds, broadcast_ids=broadcast_ids)
    assert message in str(err.value)


def test_broadcast_kinds_under_torch_compile_fullgraph():
    ids, embeds, features, kinds = _indicator_call(dtype=torch.float32)

    def f(ids, embeds, image, vectors):
        feats = [image, *[vectors[i : i + 1] for i in range(len(INDICATORS))]]
        return merge(ids, embeds, feats, kinds, check=False, broadcast_ids=INDICATORS) * 2

    vectors = torch.cat(features[1:])
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    assert_bitwise_equal(compiled(ids, embeds, features[0], vectors), f(ids, embeds, features[0], vectors))
