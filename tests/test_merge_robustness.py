"""The multimodal token merge under hostile input (issues 15 and 16): any layout of every
tensor (strided, transposed, expanded, offset into a NaN-filled buffer), D = 0, offsets
past 2^31 elements, unchecked count mismatches, ``padding_idx`` gradients, and Hugging
Face's own count-mismatch message through the patched models.

Every kernel output is NaN-poisoned before the kernel writes and compared bit for bit
with :func:`merge_multimodal_embeddings_reference`, which defines the op.
"""

from __future__ import annotations

import random

import pytest
import torch

from mmkernels.backend import Backend, recent_decisions
from mmkernels.ops import merge_multimodal_embeddings as merge
from mmkernels.ops import merge_multimodal_embeddings_reference as reference
from mmkernels.ops.merge import PlaceholderCountError
from mmkernels.testing import assert_bitwise_equal, nan_padded, poison_outputs

IMAGE, VIDEO, AUDIO = 90, 91, 92
VOCAB = 89  # text ids are drawn from [0, VOCAB); IMAGE, VIDEO, AUDIO lie outside the table
NAN = float("nan")


def run_kernel(*args, **kwargs):
    with poison_outputs():
        out = merge(*args, **kwargs)
    decision = recent_decisions()[-1]
    assert decision.backend is Backend.INTERPRETER, decision
    return out


def assert_matches_reference(*args, **kwargs):
    out = run_kernel(*args, **kwargs)
    assert_bitwise_equal(out, reference(*args, **kwargs))
    return out


# --------------------------------------------------------------------------------------
# Layouts: a tensor of a given shape whose memory is laid out in a given way.

LAYOUTS = ("contiguous", "padded", "reversed", "swap01", "expanded", "sliced")


def make(shape, dtype, layout, g, *, fill=None):
    """A tensor of ``shape`` in ``layout``, random values (or ``fill(shape)`` for ids):

    contiguous; padded: inside a NaN buffer (rows before/after, columns past each row);
    reversed: every dim reversed in memory (column-major: no unit last-dim stride);
    swap01: dims 0 and 1 swapped in memory (a (S, B, D) buffer seen as (B, S, D));
    expanded: dim 0 has stride 0 (every slice the same memory); sliced: every other
    element of the last dim of a NaN (or -2^30) buffer.
    """
    data_shape = (1, *shape[1:]) if layout == "expanded" and shape[0] > 0 else tuple(shape)
    if fill is not None:
        data = fill(data_shape)
    else:
        data = torch.randn(data_shape, generator=g, dtype=torch.float64).to(dtype)
    if layout == "contiguous" or data.numel() == 0 and layout != "padded":
        return data.clone()
    if layout == "padded":
        return nan_padded(data, rows_before=2, rows_after=3, extra_cols=5)
    if layout == "reversed":
        dims = tuple(reversed(range(data.dim())))
        return data.permute(dims).contiguous().permute(dims)
    if layout == "swap01":
        if data.dim() < 2:
            return data.clone()
        return data.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "expanded":
        return data.expand(shape)
    if layout == "sliced":
        poison = NAN if data.is_floating_point() else -(2**30)
        buf = torch.full((*data.shape[:-1], 2 * data.shape[-1]), poison, dtype=data.dtype)
        buf[..., ::2] = data
        return buf[..., ::2]
    raise AssertionError(layout)


# --------------------------------------------------------------------------------------
# A column-strided first feature tensor


def test_column_strided_first_feature_is_read_from_its_copy():
    """The base pointer of the segment table was taken before the contiguous copy of a
    column-strided first feature: the kernel read unrelated memory (values up to 1e38)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.tensor([1, IMAGE, IMAGE, 2])
    embeds = torch.randn(4, 8, generator=g)
    feats = [torch.randn(8, 2, generator=g).t()]
    out = assert_matches_reference(ids, embeds, feats, IMAGE)
    assert not out.isnan().any()
    # First of several, between others, and with the fused lookup.
    ids = torch.tensor([[1, IMAGE, IMAGE, 2, IMAGE, 3, IMAGE, IMAGE, IMAGE]])
    feats = [torch.randn(16, 2, generator=g).t(), torch.randn(1, 16, generator=g), torch.randn(16, 3, generator=g).t()]
    assert_matches_reference(ids, torch.randn(1, 9, 16, generator=g), feats, IMAGE)
    assert_matches_reference(ids, None, feats, IMAGE, embedding_weight=torch.randn(VOCAB, 16, generator=g))


# --------------------------------------------------------------------------------------
# Strides of input_ids, inputs_embeds and embedding_weight


def _ids_with_gaps(row, stride, gap_id):
    """``row`` as a view with element stride ``stride`` whose gaps hold ``gap_id``."""
    buf = torch.full((len(row) * stride,), gap_id, dtype=torch.int64)
    buf[::stride] = torch.tensor(row)
    return buf[::stride]


@pytest.mark.parametrize("fused", [False, True], ids=["embeds", "fused"])
def test_strided_and_expanded_input_ids(fused):
    g = torch.Generator().manual_seed(2)
    # Gaps full of placeholder ids: a kernel that ignores the stride counts them.
    ids = _ids_with_gaps([1, IMAGE, IMAGE, 2, 3, IMAGE, 4], 2, IMAGE)
    assert ids.stride(0) == 2
    feats = torch.randn(3, 24, generator=g)
    base = dict(embedding_weight=torch.randn(VOCAB, 24, generator=g)) if fused else {}
    embeds = None if fused else torch.randn(7, 24, generator=g)
    assert_matches_reference(ids, embeds, feats, IMAGE, **base)
    # (B, S) views: every other column of a wider buffer, a column-major buffer, and one
    # row expanded over the batch (stride 0).
    wide = torch.full((2, 14), IMAGE)
    wide[:, ::2] = torch.tensor([[1, IMAGE, 2, 3, IMAGE, 4, 5], [IMAGE, 6, 7, 8, 9, IMAGE, IMAGE]])
    column_major = wide[:, ::2].t().contiguous().t()
    expanded = torch.tensor([[1, IMAGE, 2, IMAGE, 3, 4, 5]]).expand(2, 7)
    for ids in (wide[:, ::2], column_major, expanded):
        feats = torch.randn(int((ids == IMAGE).sum()), 24, generator=g)
        embeds = None if fused else torch.randn(2, 7, 24, generator=g)
        assert_matches_reference(ids, embeds, feats, IMAGE, **base)


@pytest.mark.parametrize("layout", ["reversed", "swap01", "expanded", "sliced", "padded"])
def test_inputs_embeds_layouts(layout):
    """(B, S, D) inputs_embeds read through their strides: column-major, batch-minor
    ((S, B, D) memory), expanded over the batch, every other column, inside a NaN buffer."""
    g = torch.Generator().manual_seed(3)
    ids = torch.tensor([[1, IMAGE, IMAGE, 2, 3, 4, 5, 6, 7, 8, 9], [IMAGE, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19],
                        [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, IMAGE]])  # fmt: skip
    embeds = make((3, 11, 40), torch.float32, layout, g)
    feats = [torch.randn(2, 40, generator=g), torch.randn(2, 40, generator=g)]
    out = assert_matches_reference(ids, embeds, feats, IMAGE)
    assert not out.isnan().any()
    flat = make((33, 40), torch.float32, layout, g)
    assert not assert_matches_reference(ids.reshape(-1), flat, feats, IMAGE).isnan().any()


@pytest.mark.parametrize("layout", ["reversed", "expanded", "sliced", "padded"])
def test_embedding_weight_layouts(layout):
    """The table gathered through both strides: ``torch.randn(8, 10).t()`` (a transposed
    table, e.g. tied to a (D, V) matrix), every row the same memory, a NaN buffer."""
    g = torch.Generator().manual_seed(4)
    table = make((VOCAB, 10), torch.float32, layout, g)
    ids = torch.tensor([[0, 5, IMAGE, IMAGE, VOCAB - 1, 88, 17, IMAGE]])
    feats = torch.randn(3, 10, generator=g)
    out = assert_matches_reference(ids, None, feats, IMAGE, embedding_weight=table)
    assert not out.isnan().any()
    small = torch.randn(8, 10, generator=g).t()  # (10, 8): V = 10, D = 8
    assert_matches_reference(torch.tensor([1, 7, 7, 2, 9]), None, torch.randn(2, 8, generator=g), 7,
                             embedding_weight=small)  # fmt: skip


# --------------------------------------------------------------------------------------
# An empty hidden dim


@pytest.mark.parametrize("fn", [merge, reference], ids=["op", "reference"])
def test_empty_hidden_dim(fn):
    ids = torch.tensor([[1, IMAGE, IMAGE, 2]])
    out = fn(ids, torch.randn(1, 4, 0), torch.randn(2, 0), IMAGE)
    assert out.shape == (1, 4, 0)
    out = fn(ids, None, [torch.randn(1, 0), torch.randn(1, 0)], IMAGE, embedding_weight=torch.randn(VOCAB, 0))
    assert out.shape == (1, 4, 0)
    # The counts are still checked (the rows are empty, the tokens are not).
    with pytest.raises(ValueError, match="2 placeholder tokens in input_ids but 3 feature rows"):
        fn(ids, torch.randn(1, 4, 0), torch.randn(3, 0), IMAGE)
    with pytest.raises(ValueError, match=r"input_ids: 1 text token ids outside the embedding table \[0, 89\)"):
        fn(torch.tensor([IMAGE, VOCAB]), None, torch.randn(1, 0), IMAGE, embedding_weight=torch.randn(VOCAB, 0))
    assert fn(torch.tensor([IMAGE, 3]), None, torch.randn(5, 0), IMAGE, embedding_weight=torch.randn(VOCAB, 0),
              check=False).shape == (2, 0)  # fmt: skip


def test_empty_hidden_dim_gradients():
    ids = torch.tensor([1, IMAGE, 2])
    embeds = torch.randn(3, 0, requires_grad=True)
    feats = torch.randn(1, 0, requires_grad=True)
    grads = torch.autograd.grad(merge(ids, embeds, feats, IMAGE).sum(), [embeds, feats])
    assert [tuple(g.shape) for g in grads] == [(3, 0), (1, 0)]


# --------------------------------------------------------------------------------------
# Offsets past 2^31 elements


@pytest.fixture(scope="module")
def huge_buffer():
    """A 4 GiB fp16 buffer, never touched but for a few rows: the kernel addresses
    elements past 2^31 (the pages stay virtual; only the rows written are committed)."""
    try:
        return torch.empty(2**31 + 2**16, dtype=torch.float16)
    except RuntimeError as error:  # no overcommit on this machine
        pytest.skip(f"cannot reserve 4 GiB of address space: {error}")


def test_offsets_past_2_to_the_31_are_int64(huge_buffer):
    """token_id * row_stride of a 262144 x 8192 table is 2^31: each product the kernel
    forms (table row, table column, inputs_embeds row, a feature segment's start from the
    first one) reaches past 2^31 elements here and must not wrap."""
    g = torch.Generator().manual_seed(5)
    far = 2**30 + 8  # index 2 * far = 2^31 + 16; the views below do not overlap

    def strided(shape, stride, offset):
        view = huge_buffer.as_strided(shape, stride, offset)
        view.copy_(torch.randn(shape, generator=g).half())
        return view

    ids = torch.tensor([0, 2, IMAGE, 1, 2, IMAGE])
    for dim, table in ((16, strided((3, 16), (far, 1), 0)), (3, strided((3, 3), (1, far), 64))):
        # The second feature tensor lies 2^31 elements after the first one.
        feats = [strided((1, dim), (dim, 1), 512), strided((1, dim), (dim, 1), 2 * far + 32)]
        out = assert_matches_reference(ids, None, feats, IMAGE, embedding_weight=table)
        assert not out.isnan().any()
    embeds = strided((3, 16), (far, 1), 128)  # row 2 at 2^31 + 144
    feats = [torch.randn(1, 16, generator=g).half()]
    assert not assert_matches_reference(torch.tensor([1, IMAGE, 2]), embeds, feats, IMAGE).isnan().any()


# --------------------------------------------------------------------------------------
# check=False never reads or writes out of bounds


@pytest.mark.parametrize("fused", [False, True], ids=["embeds", "fused"])
@pytest.mark.parametrize(
    "given",
    [(0, 0), (2, 1), (9, 9), (0, 5)],
    ids=["no-features", "fewer", "more", "features-for-one-kind"],
)
def test_unchecked_count_mismatch_stays_in_bounds(fused, given):
    """Placeholders of two kinds (4 images, 3 videos) with other feature counts. Contract:
    the k-th placeholder of a kind gets that kind's feature row k while there is one;
    placeholder rows beyond the given rows are NaN; surplus rows are ignored; text rows
    are exact. The features sit inside NaN buffers: a read past a tensor's rows or
    columns would put NaN where a feature row is expected."""
    g = torch.Generator().manual_seed(6)
    ids = torch.tensor([[1, IMAGE, IMAGE, 2, VIDEO, 3], [IMAGE, VIDEO, VIDEO, 4, IMAGE, 5]])
    images, videos = given
    # The features sit inside NaN buffers, split into tensors of 1 row and the rest.
    image = [nan_padded(t) for t in torch.randn(images, 24, generator=g).split([min(images, 1), max(images - 1, 0)])]
    video = nan_padded(torch.randn(videos, 24, generator=g), rows_after=0)
    base = dict(embedding_weight=torch.randn(VOCAB, 24, generator=g)) if fused else {}
    embeds = None if fused else torch.randn(2, 6, 24, generator=g)
    out = assert_matches_reference(ids, embeds, [image, video], [IMAGE, VIDEO], check=False, **base)
    flat_ids, flat_out = ids.reshape(-1), out.reshape(12, 24)
    for kid, rows in ((IMAGE, torch.cat(image)), (VIDEO, video)):
        positions = (flat_ids == kid).nonzero().flatten()
        n = min(len(positions), rows.shape[0])
        assert torch.equal(flat_out[positions[:n]], rows[:n])
        assert flat_out[positions[n:]].isnan().all()
    text = (flat_ids != IMAGE) & (flat_ids != VIDEO)
    want = base["embedding_weight"][flat_ids[text]] if fused else embeds.reshape(12, 24)[text]
    assert torch.equal(flat_out[text], want)


def test_unchecked_out_of_table_ids_and_placeholders_inside_the_table():
    """Fused lookup, check=False: text ids outside [0, V) (negative, V, huge) are NaN rows
    and never read; a placeholder id inside the table (7) is not looked up."""
    g = torch.Generator().manual_seed(7)
    table = nan_padded(torch.randn(VOCAB, 20, generator=g), rows_before=0)
    ids = torch.tensor([-1, 7, VOCAB, 3, 2**40, 7, -(2**40), 7])
    feats = torch.randn(2, 20, generator=g)  # three placeholders, two rows
    out = assert_matches_reference(ids, None, feats, 7, embedding_weight=table, check=False)
    assert out[[0, 2, 4, 6, 7]].isnan().all()
    assert torch.equal(out[[1, 5]], feats) and torch.equal(out[3], table[3])


# --------------------------------------------------------------------------------------
# Random valid layouts against the reference


def _random_case(seed: int):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    dtype, feat_dtype = rng.choice(
        [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float64, torch.float64),
         (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16), (torch.float64, torch.float32)]
    )  # fmt: skip  (casts only widen: exact in the interpreter and on GPUs)
    dim = rng.choice([1, 3, 16, 33, 80])
    kinds = rng.sample([IMAGE, VIDEO, AUDIO, 7], rng.randint(1, 3))  # 7 is inside the table
    flat = rng.random() < 0.3
    batch, seq = (1, rng.choice([0, 1, 9, 23])) if flat else (rng.choice([0, 1, 2, 3]), rng.choice([0, 1, 5, 17]))
    fused = rng.random() < 0.4
    check = rng.random() < 0.6

    def fill_ids(shape):
        ids = torch.randint(0, VOCAB, shape, generator=g)
        ids[ids == 7] = 8
        n = ids.numel()
        for kid in kinds:  # runs of each kind, zero to a few per row
            for _ in range(rng.randint(0, 2)):
                if n == 0:
                    break
                start = rng.randrange(n)
                ids.view(-1)[start : start + rng.randint(1, 6)] = kid
        return ids.to(rng.choice([torch.int32, torch.int64]))

    id_shape = (batch * seq,) if flat else (batch, seq)
    ids = make(id_shape, None, rng.choice(["contiguous", "reversed", "expanded", "sliced"]), g, fill=fill_ids)
    counts = [int((ids == kid).sum()) for kid in kinds]
    if not check:  # unchecked: other row counts (more or fewer)
        counts = [max(0, c + rng.choice([-3, -1, 0, 2])) for c in counts]

    features = []
    for count in counts:
        if rng.random() < 0.3:
            features.append(make((count, dim), feat_dtype, rng.choice(LAYOUTS), g))
            continue
        cuts = sorted(rng.randint(0, count) for _ in range(rng.randint(0, 3)))
        lengths = [b - a for a, b in zip([0, *cuts], [*cuts, count])]  # zero-length tensors included
        features.append([make((n, dim), feat_dtype, rng.choice(LAYOUTS), g) for n in lengths])
    kwargs = dict(check=check)
    if fused:
        kwargs["embedding_weight"] = make((VOCAB, dim), dtype, rng.choice(LAYOUTS), g)
        embeds = None
    else:
        embeds = make((*id_shape, dim), dtype, rng.choice(LAYOUTS), g)
    if len(kinds) == 1 and rng.random() < 0.5:
        return ids, embeds, features[0], kinds[0], kwargs
    return ids, embeds, features, kinds, kwargs


@pytest.mark.parametrize("seed", range(40))
def test_random_layouts_match_the_reference(seed):
    ids, embeds, features, kinds, kwargs = _random_case(seed)
    out = assert_matches_reference(ids, embeds, features, kinds, **kwargs)
    assert out.shape == (*ids.shape, out.shape[-1]) and out.is_contiguous()
    if kwargs["check"]:
        assert not out.isnan().any()


def test_random_cases_cover_the_layouts():
    """The seeds above do draw what they claim: every layout kind, several ids, empty
    sequences, no features, unchecked mismatches, both lookups."""
    seen = set()
    for seed in range(40):
        ids, embeds, features, kinds, kwargs = _random_case(seed)
        seen.add(("fused", embeds is None))
        seen.add(("check", kwargs["check"]))
        seen.add(("empty", ids.numel() == 0))
        seen.add(("kinds", isinstance(kinds, list) and len(kinds) > 1))
        base = embeds if embeds is not None else kwargs["embedding_weight"]
        seen.add(("expanded", 0 in base.stride()))
        seen.add(("column-strided", base.dim() > 0 and base.shape[-1] > 1 and base.stride(-1) != 1))
        seen.add(("ids-strided", ids.dim() > 0 and ids.numel() > 1 and ids.stride(-1) != 1))
        kind_list, per_kind = (kinds, features) if isinstance(kinds, list) else ([kinds], [features])
        seen.add(("kind without placeholders", any(int((ids == k).sum()) == 0 for k in kind_list)))
        lengths = [{t.shape[0] for t in f} for f in per_kind if isinstance(f, list)]
        seen.add(("tensors of different lengths", any(len(n) > 1 for n in lengths)))
    for wanted in [("fused", True), ("fused", False), ("check", True), ("check", False), ("empty", True),
                   ("kinds", True), ("expanded", True), ("column-strided", True), ("ids-strided", True),
                   ("kind without placeholders", True), ("tensors of different lengths", True)]:  # fmt: skip
        assert wanted in seen, wanted


# --------------------------------------------------------------------------------------
# padding_idx in the fused lookup's gradient (issue 16.1)


@pytest.mark.parametrize("padding_idx", [0, 5, -VOCAB + 5, None])
def test_padding_idx_gradient_matches_f_embedding(padding_idx):
    """The table's gradient is F.embedding's with the same padding_idx: pad tokens (0 and
    5 here) give their row nothing; the values do not change."""
    g = torch.Generator().manual_seed(8)
    ids = torch.tensor([[0, 0, 5, 1, IMAGE, IMAGE, 2, 5], [3, IMAGE, 0, 5, 4, 4, 0, 0]])
    table = torch.randn(VOCAB, 12, dtype=torch.float64, generator=g, requires_grad=True)
    feats = torch.randn(3, 12, dtype=torch.float64, generator=g, requires_grad=True)
    upstream = torch.randn(2, 8, 12, dtype=torch.float64, generator=g)

    def grads(fn):
        out = fn(ids, None, feats, IMAGE, embedding_weight=table, padding_idx=padding_idx)
        return [out.detach(), *torch.autograd.grad((out * upstream).sum(), [table, feats])]

    got, want = grads(merge), grads(reference)
    for name, a, b in zip(["output", "table gradient", "feature gradient"], got, want):
        assert_bitwise_equal(a, b, name=name)
    # The unpatched model's computation: embedding, then placeholders overwritten.
    emb = torch.nn.functional.embedding(ids.clamp(max=VOCAB - 1), table, padding_idx=padding_idx)
    merged = emb.masked_scatter((ids == IMAGE)[..., None], feats)
    unfused = torch.autograd.grad((merged * upstream).sum(), table)[0]
    torch.testing.assert_close(got[1], unfused, rtol=1e-12, atol=0)
    if padding_idx is not None:
        assert not got[1][padding_idx % VOCAB].any()
    else:
        assert got[1][0].abs().sum() > 0


BAD_PADDING = [
    ("type", dict(padding_idx=1.0), TypeError, "padding_idx: expected an int or None, got float"),
    ("bool", dict(padding_idx=True), TypeError, "padding_idx: expected an int or None, got bool"),
    ("too large", dict(padding_idx=VOCAB), ValueError, r"padding_idx: expected an index in \[-89, 89\).*got 89"),
    ("too small", dict(padding_idx=-VOCAB - 1), ValueError, r"padding_idx: expected an index in \[-89, 89\)"),
    ("no table", dict(padding_idx=0, table=False), ValueError, "padding_idx: only meaningful with embedding_weight"),
]


@pytest.mark.parametrize("fn", [merge, reference], ids=["op", "reference"])
@pytest.mark.parametrize("name,kwargs,error,message", BAD_PADDING, ids=[b[0] for b in BAD_PADDING])
def test_bad_padding_idx_names_the_argument(fn, name, kwargs, error, message):
    kwargs = dict(kwargs)
    ids, feats = torch.tensor([1, IMAGE]), torch.zeros(1, 4)
    if kwargs.pop("table", True):
        call = lambda: fn(ids, None, feats, IMAGE, embedding_weight=torch.zeros(VOCAB, 4), **kwargs)  # noqa: E731
    else:
        call = lambda: fn(ids, torch.zeros(2, 4), feats, IMAGE, **kwargs)  # noqa: E731
    with pytest.raises(error, match=message):
        call()


def test_direct_custom_op_call_takes_padding_idx():
    """torch.ops.mmkernels.merge_multimodal_embeddings: padding_idx is the last, optional argument."""
    ids = torch.tensor([0, IMAGE, 3])
    table = torch.randn(VOCAB, 4, requires_grad=True)
    op = torch.ops.mmkernels.merge_multimodal_embeddings
    out = op(ids, None, [torch.randn(1, 4)], [1], [IMAGE], table, True, 0)
    (grad,) = torch.autograd.grad(out.sum(), table)
    assert not grad[0].any() and grad[3].eq(1).all()
    out = op(ids, None, [torch.randn(1, 4)], [1], [IMAGE], table, True)  # the old arity still works
    (grad,) = torch.autograd.grad(out.sum(), table)
    assert grad[0].eq(1).all()


# --------------------------------------------------------------------------------------
# Through patched Hugging Face models: padding_idx, the fusion's eligibility, HF's message (16.6)


@pytest.fixture(scope="module")
def llava():
    pytest.importorskip("transformers")
    from mmkernels import zoo

    tiny = zoo.build("llava", batch=2)  # left-padded batch: pad tokens in row 0
    embedding = tiny.model.get_input_embeddings()
    assert embedding.padding_idx is not None
    assert (tiny.inputs["input_ids"] == embedding.padding_idx).any()
    return tiny


def _patched(model):
    from mmkernels import patch

    return patch(model, kernels=("merge",))


def _loss_and_grads(tiny):
    model = tiny.model
    model.zero_grad(set_to_none=True)
    logits = model(**tiny.inputs).logits
    logits.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


def _assert_same_training_step(tiny, spy_calls):
    from mmkernels import unpatch

    want_logits, want = _loss_and_grads(tiny)
    _patched(tiny.model)
    try:
        logits, got = _loss_and_grads(tiny)
    finally:
        unpatch(tiny.model)
    assert spy_calls() == 1, "the patched forward must have run the merge"
    assert torch.equal(logits, want_logits)
    assert got.keys() == want.keys()
    for name in want:
        # Summation order in the embedding backward may differ: a few fp32 ulps.
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


def test_patched_model_pad_row_gets_no_gradient(llava, merge_calls):
    """Training through the fused lookup: every parameter's gradient equals the unpatched
    model's; the padding_idx row of embed_tokens gets none (it got one per pad token)."""
    _assert_same_training_step(llava, lambda: len(merge_calls))
    assert merge_calls[0].get("embedding_weight") is not None, "the lookup should stay fused"
    assert merge_calls[0].get("padding_idx") == llava.model.get_input_embeddings().padding_idx


@pytest.mark.parametrize("option", ["scale_grad_by_freq", "max_norm", "forward_hook", "pre_hook"])
def test_embedding_options_that_change_values_or_gradients_are_not_fused(llava, merge_calls, option):
    """max_norm renormalizes, scale_grad_by_freq scales the gradient, hooks change the
    output (NEFTune) or its autograd (enable_input_require_grads): the module runs itself."""
    from mmkernels.integrations.hf_merge import _unfused_reason

    embedding = llava.model.get_input_embeddings()
    saved = (embedding.max_norm, embedding.scale_grad_by_freq, embedding.weight.detach().clone())
    handle = None
    if option == "scale_grad_by_freq":
        embedding.scale_grad_by_freq = True
    elif option == "max_norm":
        embedding.max_norm = 1.0
    elif option == "forward_hook":
        handle = embedding.register_forward_hook(lambda module, args, out: out * 1.5 + 0.25)
    else:
        handle = embedding.register_forward_pre_hook(lambda module, args: (args[0].clamp(min=1),))
    try:
        assert _unfused_reason(embedding) is not None
        _assert_same_training_step(llava, lambda: len(merge_calls))
        assert merge_calls[0].get("embedding_weight") is None
    finally:
        embedding.max_norm, embedding.scale_grad_by_freq = saved[0], saved[1]
        with torch.no_grad():
            embedding.weight.copy_(saved[2])  # max_norm renormalized rows in place
        if handle is not None:
            handle.remove()
    assert _unfused_reason(embedding) is None


def test_unfused_reasons():
    from mmkernels.integrations.hf_merge import _unfused_reason

    assert _unfused_reason(torch.nn.Embedding(10, 4, padding_idx=0)) is None
    assert "sparse" in _unfused_reason(torch.nn.Embedding(10, 4, sparse=True))
    assert "scale_grad_by_freq" in _unfused_reason(torch.nn.Embedding(10, 4, scale_grad_by_freq=True))
    assert "max_norm" in _unfused_reason(torch.nn.Embedding(10, 4, max_norm=2.0))

    class Scaled(torch.nn.Embedding):
        pass

    assert "not a plain nn.Embedding" in _unfused_reason(Scaled(10, 4))
    embedding = torch.nn.Embedding(10, 4)
    handle = embedding.register_full_backward_hook(lambda *args: None)
    assert "hooks" in _unfused_reason(embedding)
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert "hooks" in _unfused_reason(embedding)
    finally:
        handle.remove()
    assert _unfused_reason(embedding) is None


def _drop_placeholder(inputs, placeholder, replacement):
    inputs = dict(inputs)
    ids = inputs["input_ids"].clone()
    first = (ids == placeholder).nonzero()[0]
    ids[tuple(first)] = replacement
    inputs["input_ids"] = ids
    return inputs


def _hf_message(kind, tokens, features):
    return f"{kind.capitalize()} features and {kind} tokens do not match, tokens: {tokens}, features: {features}"


@pytest.mark.parametrize("family,kind", [("llava", "image"), ("qwen2_vl", "video")])
def test_count_mismatch_raises_hugging_faces_message(family, kind):
    """Code that catches the unpatched model's error by its text keeps working: the
    patched model raises ValueError with the same words and both counts."""
    pytest.importorskip("transformers")
    from mmkernels import unpatch, zoo

    tiny = zoo.build(family, batch=1)
    placeholder = tiny.placeholder_ids[kind]
    rows = int((tiny.inputs["input_ids"] == placeholder).sum())
    inputs = _drop_placeholder(tiny.inputs, placeholder, tiny.tokenizer.convert_tokens_to_ids("the"))
    with torch.no_grad():
        with pytest.raises(ValueError) as unpatched:
            tiny.model(**inputs)
        _patched(tiny.model)
        try:
            with pytest.raises(ValueError) as patched:
                tiny.model(**inputs)
        finally:
            unpatch(tiny.model)
    prefix = f"{kind.capitalize()} features and {kind} tokens do not match, tokens: {rows - 1}, features: "
    assert str(unpatched.value).startswith(prefix), str(unpatched.value)
    # The feature count is the row count (LLaVA's own message prints rows x D there).
    assert str(patched.value) == _hf_message(kind, rows - 1, rows), str(patched.value)
    assert isinstance(patched.value.__cause__, PlaceholderCountError)


def test_hf_message_names_the_first_mismatching_kind():
    from mmkernels.integrations.hf_merge import _hf_count_error
    from mmkernels.integrations.hf_specs import MERGE_SPECS

    (spec,) = [s for s in MERGE_SPECS if s.model_type == "qwen2_vl"]
    image, video = spec.modalities
    error = PlaceholderCountError([IMAGE, VIDEO], [4, 7], [4, 9])
    assert str(_hf_count_error(error, [image, video])) == _hf_message("video", 7, 9)
    error = PlaceholderCountError([IMAGE, VIDEO], [3, 7], [4, 9])
    assert str(_hf_count_error(error, [image, video])) == _hf_message("image", 3, 4)
    assert type(_hf_count_error(error, [image, video])) is ValueError
