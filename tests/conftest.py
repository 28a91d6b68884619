"""Test setup. Triton reads TRITON_INTERPRET when a kernel is decorated, so it is set
here, before anything imports mmkernels: kernel tests run the real Triton kernels in the
interpreter on CPU tensors. The GPU suite sets MMK_TEST_GPU=1 and runs `-m gpu` with
compiled kernels instead. Nothing is downloaded (HF_HUB_OFFLINE)."""

import os

if os.environ.get("MMK_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    # Call plans replay what an earlier call with the same key launched; a test that
    # patches an op's internals (its config, its launcher) must not replay another test's.
    from mmkernels import backend

    backend.clear_call_plans()
    yield


def pytest_collection_modifyitems(config, items):
    if os.environ.get("MMK_TEST_GPU") == "1" and os.environ.get("TRITON_INTERPRET") == "1":
        # A GPU run whose kernels were decorated as interpreted would skip every GPU test.
        raise pytest.UsageError(
            "MMK_TEST_GPU=1 but TRITON_INTERPRET=1 is set (by the environment or a test module at import): "
            "the GPU tests need compiled kernels; unset TRITON_INTERPRET"
        )
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return
    reason = "needs a CUDA device and compiled kernels (run by tools/gpu_suite.py with MMK_TEST_GPU=1)"
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def merge_calls(monkeypatch):
    """The keyword arguments of each call of ``mmkernels.ops.merge_multimodal_embeddings``
    (the patched forwards import it at call time, so the spy sees theirs)."""
    import mmkernels.ops

    calls = []
    op = mmkernels.ops.merge_multimodal_embeddings

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return op(*args, **kwargs)

    monkeypatch.setattr(mmkernels.ops, "merge_multimodal_embeddings", spy)
    return calls


@pytest.fixture
def merge_spy(monkeypatch):
    """A ``zoo_helpers.MergeSpy`` on ``mmkernels.ops.merge_multimodal_embeddings``: the
    count of calls and the last one's arguments."""
    from zoo_helpers import MergeSpy

    return MergeSpy(monkeypatch)
