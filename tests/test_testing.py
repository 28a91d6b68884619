"""The validation harness itself: it must catch what it claims to catch."""

from __future__ import annotations

import math

import pytest
import torch

from mmkernels.backend import empty_output
from mmkernels.testing import (
    HostSyncCounter,
    assert_bitwise_equal,
    assert_close,
    assert_deterministic,
    nan_padded,
    poison_outputs,
    relative_error,
    tolerance,
)


@torch.library.custom_op("mmkernels_test::syncing_op", mutates_args=())
def _syncing_op(x: torch.Tensor) -> torch.Tensor:
    int(x.sum())
    x.nonzero()
    return x.clone()


@_syncing_op.register_fake
def _(x):
    return torch.empty_like(x)


def test_host_sync_counter_sees_every_kind_of_sync():
    x = torch.arange(6.0)
    mask = x > 2
    with HostSyncCounter() as c:
        x.sum().item()
        bool(x.any())
        x.nonzero()
        x[mask]
        x.tolist()
        torch.masked_select(x, mask)
        torch.unique(x)
    assert c.ops["aten._local_scalar_dense"] == 2  # .item() and bool()
    assert c.ops["aten.nonzero"] == 1
    assert c.ops["aten.index (boolean mask)"] == 1
    assert c.ops["Tensor.tolist"] == 1
    assert c.ops["aten.masked_select"] == 1
    assert c.count == 7


def test_host_sync_counter_sees_inside_custom_ops_and_not_async_work():
    x = torch.arange(6.0)
    with HostSyncCounter() as c:
        _syncing_op(x)
    assert dict(c.ops) == {"aten._local_scalar_dense": 1, "aten.nonzero": 1}
    with HostSyncCounter() as none:
        y = x * 2 + 1
        x.masked_fill(x > 2, 0)
        torch.cumsum(y, 0)
    assert none.count == 0, none


def test_relative_error_and_tolerances():
    ref = torch.ones(100, dtype=torch.float64)
    assert relative_error(ref.float(), ref) == 0
    bad = ref.clone()
    bad[3] = float("nan")
    assert relative_error(bad, ref) == math.inf
    assert tolerance(torch.bfloat16, 100) == pytest.approx(10 * tolerance(torch.bfloat16))
    with pytest.raises(AssertionError, match="relative error"):
        assert_close(ref * 1.01, ref, dtype=torch.float32)
    assert_close((ref * (1 + 1e-3)).to(torch.bfloat16), ref)


def test_bitwise_equal_distinguishes_nan_payload_and_signed_zero():
    assert_bitwise_equal(torch.tensor([float("nan")]), torch.tensor([float("nan")]))
    with pytest.raises(AssertionError, match="differ bitwise"):
        assert_bitwise_equal(torch.tensor([0.0]), torch.tensor([-0.0]))
    with pytest.raises(AssertionError, match="second run"):
        it = iter([torch.zeros(2), torch.ones(2)])
        assert_deterministic(lambda: next(it))


def test_nan_padded_is_equal_strided_and_surrounded_by_nan():
    t = torch.randn(2, 5, 8)
    v = nan_padded(t, rows_before=2, rows_after=3, extra_cols=4)
    assert torch.equal(v, t) and v.stride() == (5 * 12, 12, 1)
    base = v.reshape(-1, 8)  # a view back onto the buffer's rows
    flat = torch.as_strided(v, (10 + 5, 12), (12, 1), v.storage_offset() - 2 * 12)
    assert flat[:2].isnan().all() and flat[-3:].isnan().all() and flat[2:12, 8:].isnan().all()
    assert base.shape == (10, 8)


def test_poison_outputs_is_scoped():
    with poison_outputs():
        assert empty_output((3,), torch.float32, "cpu").isnan().all()
    assert empty_output((3,), torch.float32, "cpu").shape == (3,)
