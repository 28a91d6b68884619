"""The results folder (:class:`ResultsFolder`: ``results.json``, ``results.md``, the PNGs),
the roofline a folder already holds (:func:`roofline_from_folder`), and a benchmark
run into a folder (:func:`run_into_folder`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import common
from .common import NOT_TIMED
from .plots import PLOTS
from .providers import Benchmark, BenchmarkResult
from .report import render_markdown, skipped_baselines
from .roofline import Roofline
from .run import run_benchmark
from .stamp import device_stamp


def _declares_work(bench: dict) -> bool:
    """Whether a benchmark's cells declare bytes or FLOPs (model benchmarks and raw_pixels'
    bus-speed copies do not): only then has it a roofline plot."""
    rows = bench.get("rows", [])
    if bench.get("kind") == "model":
        return False
    return not rows or any(r.get("bytes") or r.get("flops") for r in rows)


def _file_stem(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


class ResultsFolder:
    """One results folder: ``results.json``, ``results.md`` and per benchmark
    ``<benchmark>.png``, ``<benchmark>-speedup.png``, ``<benchmark>-roofline.png``.

    Every update re-reads ``results.json``, merges, and rewrites the JSON and the
    Markdown (and the benchmark's plots unless ``plot=False``), so several benchmarks
    (run in separate processes) share one folder.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @property
    def json_path(self) -> Path:
        return self.path / "results.json"

    @property
    def md_path(self) -> Path:
        return self.path / "results.md"

    def load(self) -> dict:
        if self.json_path.exists():
            return json.loads(self.json_path.read_text())
        return {"timed": False, "not_timed_reason": "", "benchmarks": {}}

    def update(self, *, stamp: dict | None = None, roofline: Roofline | None = None,
               benchmark: BenchmarkResult | None = None, suite: dict | None = None, plot: bool = True) -> dict:  # fmt: skip
        """Merge what is given into the folder; a stamp is taken if the folder has none."""
        self.path.mkdir(parents=True, exist_ok=True)
        data = self.load()
        if stamp is not None or "stamp" not in data:
            data["stamp"] = stamp if stamp is not None else device_stamp()
        if roofline is not None:
            data["roofline"] = roofline.to_dict()
        elif benchmark is not None and benchmark.roofline is not None and not (data.get("roofline") or {}).get("copy_gbps"):
            data["roofline"] = benchmark.roofline.to_dict()
        if benchmark is not None:
            data.setdefault("benchmarks", {})[benchmark.benchmark] = benchmark.to_dict()
        if suite is not None:
            data["suite"] = suite
        self._set_timed(data)
        self._write(data, [benchmark.benchmark] if benchmark is not None and plot else [])
        return data

    def render(self) -> dict:
        """Rewrite every benchmark's plots, the JSON and the Markdown from ``results.json``."""
        data = self.load()
        self._set_timed(data)
        self._write(data, list(data.get("benchmarks", {})))
        return data

    @staticmethod
    def _set_timed(data: dict) -> None:
        benches = list(data.get("benchmarks", {}).values())
        data["timed"] = bool(benches) and all(b.get("timed") for b in benches)
        reasons = list(dict.fromkeys(b["not_timed_reason"] for b in benches if not b.get("timed")))
        if not benches:
            reasons = [data.get("not_timed_reason") or f"{NOT_TIMED}: no benchmark has run yet"]
        data["not_timed_reason"] = "; ".join(r for r in reasons if r)
        data["timing_sources"] = sorted({b.get("timing_source") for b in benches if b.get("timing_source")})
        data["skipped_baselines"] = skipped_baselines(data)

    def _write(self, data: dict, plotted: Sequence[str]) -> None:
        for name in plotted:
            bench = data["benchmarks"][name]
            for key, pattern, draw in PLOTS:
                if key == "roofline_plot" and not _declares_work(bench):
                    continue  # no declared bytes or FLOPs: latency, speedup and memory only
                filename = pattern.format(name=_file_stem(name))
                problem = draw(bench, data.get("roofline"), self.path / filename)
                bench[key] = problem or filename
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
        tmp.replace(self.json_path)
        self.md_path.write_text(render_markdown(data))


def roofline_from_folder(out_dir: str | os.PathLike, device: torch.device | str = "cuda") -> Roofline | None:
    """The roofline already measured into ``out_dir`` in this run on this device, if any."""
    data = ResultsFolder(out_dir).load()
    roof = data.get("roofline")
    if not roof or roof.get("copy_gbps") is None or not common.cuda_available():
        return None
    if roof.get("device_name") != torch.cuda.get_device_name(torch.device(device)):
        return None
    return Roofline.from_dict(roof)


def run_into_folder(bench: Benchmark, out_dir: str | os.PathLike, *, quick: bool = False,
                    counter_class=None, on_case: Callable[[BenchmarkResult], None] | None = None,
                    **kwargs) -> BenchmarkResult:  # fmt: skip
    """What each ``benchmarks/bench_*.py`` module's ``run()`` does: run ``bench`` (timed
    on CUDA, validated on the CPU otherwise) and merge its rows into ``out_dir`` after
    every case (JSON and Markdown; the plots once, at the end). Reuses a roofline the
    folder already holds for this device. ``on_case`` also gets the partial result after
    every case (a progress bar); ``kwargs`` go to :func:`run_benchmark`."""
    folder = ResultsFolder(out_dir)
    if kwargs.get("roofline") is None and kwargs.get("timing_source") is None:
        kwargs["roofline"] = roofline_from_folder(out_dir) if common.cuda_available() else None

    def progress(partial: BenchmarkResult) -> None:
        folder.update(benchmark=partial, plot=False)
        if on_case is not None:
            on_case(partial)

    result = run_benchmark(bench, quick=quick, on_progress=progress, counter_class=counter_class, **kwargs)
    folder.update(benchmark=result)
    return result
