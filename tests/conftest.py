"""Test setup. Triton reads TRITON_INTERPRET when a kernel is decorated, so it is set
here, before anything imports mmkernels: kernel tests run the real Triton kernels in the
interpreter on CPU tensors. Nothing is downloaded (HF_HUB_OFFLINE)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
