"""pytest-benchmark cells (shared by every ``benchmarks/bench_*.py``): a module-scoped
session (:func:`pytest_session`) and one cell (:func:`run_pytest_cell`)."""

from __future__ import annotations

import torch

from . import common
from .providers import Benchmark
from .run import BenchSession

NOT_TIMED_SKIP = "no CUDA device: harness validated, not timed"


def pytest_session(bench: Benchmark):
    """A module-scoped session for a benchmark's cells: on CUDA it times them; without
    CUDA each cell runs the CPU self-check (scaled-down case, output against the oracle,
    host syncs). Use as ``session = pytest.fixture(scope="module")(pytest_session(BENCH))``."""

    def session():
        s = BenchSession(bench, "cuda" if common.cuda_available() else "cpu")
        yield s
        s.release()

    return session


def run_pytest_cell(benchmark, session: BenchSession, case, provider_name: str) -> None:
    """One pytest-benchmark cell: the harness's CUDA-event numbers go to
    ``benchmark.extra_info``; pytest-benchmark's own statistics are wall-clock of
    synchronized calls (host overhead included). Skips with the reason on a CPU."""
    import pytest

    provider = next(p for p in session.bench.providers if p.name == provider_name)
    if session.device.type != "cuda":
        row = session.check_cell_on_cpu(case, provider, NOT_TIMED_SKIP)
        if row.status == "failed":
            pytest.fail(f"CPU check of {provider_name} on {case.name}: {row.reason}")
        detail = f" ({provider_name} skipped on the CPU: {row.reason})" if row.status == "skipped" else ""
        pytest.skip(NOT_TIMED_SKIP + detail)

    row = session.run_cell(case, provider)
    if row.status == "skipped":
        pytest.skip(f"{provider_name}: {row.reason}")
    if row.status == "failed":
        pytest.fail(f"{provider_name} on {case.name}: {row.reason}")
    if provider is session.bench.providers[0]:
        session.baseline_ms[case.name] = row.median_ms
    if case.name in session.baseline_ms:
        row.speedup = session.baseline_ms[case.name] / row.median_ms
    benchmark.extra_info.update({k: v for k, v in row.to_dict().items() if k not in ("params", "host_sync_ops")})
    benchmark.extra_info["shape"] = case.params()
    fn = session.built(provider)
    inputs = session.arg_sets(case)[0]

    def synchronized_call():
        with torch.inference_mode():
            fn(inputs)
        torch.cuda.synchronize()

    benchmark.pedantic(synchronized_call, rounds=10, warmup_rounds=2, iterations=1)
