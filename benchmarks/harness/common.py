"""What every module of the harness shares: the statuses of a cell that is not timed
(:data:`NOT_TIMED`, :data:`NO_CUDA`), :func:`cuda_available` (the one place the harness
asks; tests patch it here) and :func:`error_text`."""

from __future__ import annotations

import torch

NOT_TIMED = "not timed"
NO_CUDA = "no CUDA device"


def cuda_available() -> bool:
    return torch.cuda.is_available()


def error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 400 else text[:397] + "..."
