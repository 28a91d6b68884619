"""What a results folder says in words: ``results.md`` (:func:`render_markdown`: the stamp,
the roofline, the tables) and the summaries of ``results.json`` content
(:func:`summarize`, :func:`skipped_baselines`, :func:`row_size`)."""

from __future__ import annotations

import math
import re
from typing import Sequence

from .common import NOT_TIMED
from .run import CUDA_EVENTS


def _fmt(value, spec: str, missing: str = "") -> str:
    return missing if value is None else format(value, spec)


def _stamp_line(stamp: dict) -> str:
    gpu = stamp.get("gpu", {})
    if gpu.get("nvml") == "ok":
        gpu_text = (
            f"{gpu.get('name')} (driver {gpu.get('driver')}, SM {gpu.get('sm_clock_mhz')}/"
            f"{gpu.get('max_sm_clock_mhz')} MHz, memory {gpu.get('memory_clock_mhz')}/"
            f"{gpu.get('max_memory_clock_mhz')} MHz, power limit {gpu.get('power_limit_w')} W)"
        )
    else:
        gpu_text = f"{gpu.get('name', 'unknown')} (NVML {gpu.get('nvml', 'not queried')})"
    return (
        f"- GPU: {gpu_text}\n"
        f"- torch {stamp.get('torch')} (CUDA {stamp.get('torch_cuda')}), triton {stamp.get('triton')}, "
        f"transformers {stamp.get('transformers')}, Python {stamp.get('python')}\n"
        f"- commit `{stamp.get('git_commit')}`, {stamp.get('date')}, host {stamp.get('hostname')}\n"
    )


def _roofline_line(roof: dict | None) -> str:
    if not roof:
        return "- Roofline: not measured\n"
    if roof.get("copy_gbps") is None:
        return f"- Roofline: {roof.get('reason') or 'not measured'}\n"
    return (
        f"- Roofline measured in this run: copy {roof['copy_gbps']:.0f} GB/s "
        f"({roof['copy_bytes'] / 2**30:.1f} GiB moved per copy), bf16 matmul "
        f"{roof['matmul_tflops']:.0f} TFLOP/s ({roof['matmul_size']}^3); % roofline = "
        "max(bytes / copy BW, FLOPs / matmul rate) / median\n"
    )


def _table_header(graph: bool) -> str:
    """The per-benchmark table's header; ``graph``: with the CUDA-graph columns."""
    extra = " graph ms | graph speedup | graph % roofline |" if graph else ""
    return (
        "| case | provider | status | median ms | p20-p80 ms | GB/s | % copy BW | TFLOP/s | % matmul "
        f"| % roofline | speedup |{extra} peak MiB | host syncs | correct | note |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * (3 * graph) + "---:|---:|---|---|\n"
    )


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _row_line(r: dict, graph: bool = False) -> str:
    spread = "" if r.get("p20_ms") is None else f"{r['p20_ms']:.4f}-{r['p80_ms']:.4f}"
    syncs = "" if r.get("host_syncs") is None else f"{r['host_syncs']} ({r.get('host_syncs_device', '')})"
    correct = {True: "yes", False: "NO", None: ""}[r.get("correct")]
    note = r.get("reason", "")
    if r.get("status") == NOT_TIMED and note.startswith(NOT_TIMED):
        note = ""  # said once above the table
    if graph and r.get("graph_note"):
        note = f"{note}; graph: {r['graph_note']}" if note else f"graph: {r['graph_note']}"
    # The route a table chose for mmkernels' ops (the decision text says "via ROUTE (SOURCE)").
    routes = list(dict.fromkeys(re.findall(r" via (\S+) \((\w+)\)", r.get("backend") or "")))
    if routes:
        chosen = "route " + ", ".join(f"{name} ({source})" for name, source in routes)
        note = f"{note}; {chosen}" if note else chosen
    graph_cells = [
        _fmt(r.get("graph_median_ms"), ".4f"), _fmt(r.get("graph_speedup"), ".2f"),
        _fmt(r.get("graph_pct_roofline"), ".1f"),
    ] if graph else []  # fmt: skip
    cells = [
        r["case"], r["provider"], r["status"], _fmt(r.get("median_ms"), ".4f"), spread,
        _fmt(r.get("gbps"), ".1f"), _fmt(r.get("pct_copy_bw"), ".1f"), _fmt(r.get("tflops"), ".2f"),
        _fmt(r.get("pct_matmul"), ".1f"), _fmt(r.get("pct_roofline"), ".1f"), _fmt(r.get("speedup"), ".2f", ""),
        *graph_cells, _fmt(r.get("peak_mem_mib"), ".1f"), syncs, correct, note,
    ]  # fmt: skip
    return "| " + " | ".join(_md_cell(c) for c in cells) + " |\n"


# --------------------------------------------------------------------------------------
# Summaries (pure functions of results.json content: also used by mmkernels.bench and
# tools/results_page.py)


def row_size(bench: dict, row: dict) -> float | None:
    """A row's main size: ``params[size_param]`` of its benchmark, else its declared bytes."""
    key = bench.get("size_param") or ""
    value = row.get("params", {}).get(key) if key else row.get("bytes")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


def size_label(bench: dict) -> str:
    return bench.get("size_label") or bench.get("size_param") or "declared bytes"


def _geomean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def _benchmarks_in_order(data: dict) -> list[tuple[str, dict]]:
    """Kernels first, then models; by name within each."""
    items = data.get("benchmarks", {}).items()
    return sorted(items, key=lambda kv: (kv[1].get("kind", "kernel") != "kernel", kv[0]))


def summarize(data: dict) -> list[dict]:
    """One entry per (benchmark, provider): timed cells, speedup over the benchmark's
    baseline (geometric mean, min, max, and at the largest size timed), the best % of
    roofline, the peak memory at the largest size, and how many cells were skipped or
    failed."""
    out = []
    for name, bench in _benchmarks_in_order(data):
        providers = [p["name"] for p in bench.get("providers", [])] or list(
            dict.fromkeys(r["provider"] for r in bench.get("rows", []))
        )
        baseline = providers[0] if providers else ""
        for provider in providers:
            rows = [r for r in bench.get("rows", []) if r["provider"] == provider]
            ok = [r for r in rows if r.get("status") == "ok" and r.get("median_ms") is not None]
            speedups = [r["speedup"] for r in ok if r.get("speedup")]
            graph_speedups = [r["graph_speedup"] for r in ok if r.get("graph_speedup")]
            largest = max(ok, key=lambda r: (row_size(bench, r) or 0.0, r.get("bytes", 0)), default=None)
            pct = [r["pct_roofline"] for r in ok if r.get("pct_roofline") is not None]
            out.append({
                "benchmark": name, "kind": bench.get("kind", "kernel"), "provider": provider,
                "baseline": baseline, "cells": len(rows), "ok": len(ok),
                "skipped": sum(r.get("status") == "skipped" for r in rows),
                "failed": sum(r.get("status") == "failed" for r in rows),
                "not_timed": sum(r.get("status") == NOT_TIMED for r in rows),
                "speedup_geomean": _geomean(speedups),
                "speedup_min": min(speedups) if speedups else None,
                "speedup_max": max(speedups) if speedups else None,
                "largest_case": largest["case"] if largest else "",
                "speedup_at_largest": largest.get("speedup") if largest else None,
                "median_ms_at_largest": largest.get("median_ms") if largest else None,
                "peak_mem_mib_at_largest": largest.get("peak_mem_mib") if largest else None,
                "best_pct_roofline": max(pct) if pct else None,
                "graph_cells": len(graph_speedups),
                "graph_speedup_geomean": _geomean(graph_speedups),
            })  # fmt: skip
    return out


def skipped_baselines(data: dict) -> list[dict]:
    """Every (benchmark, provider) with skipped cells, by name, with the distinct reasons."""
    out = []
    for name, bench in _benchmarks_in_order(data):
        by_provider: dict[str, list[dict]] = {}
        for r in bench.get("rows", []):
            if r.get("status") == "skipped":
                by_provider.setdefault(r["provider"], []).append(r)
        for provider, rows in by_provider.items():
            reasons = list(dict.fromkeys(r.get("reason", "") for r in rows))
            out.append({"benchmark": name, "provider": provider, "cells": len(rows), "reasons": reasons})
    return out


def _summary_markdown(data: dict) -> str:
    summary = summarize(data)
    if not summary:
        return ""
    out = [
        "\n## Summary\n\nSpeedup = the baseline's median / the provider's median, per cell (> 1: faster than "
        "the baseline); geometric mean over the cells timed. \"At largest\": the timed cell of the largest "
        "main size. Graph speedup: the same from CUDA-graph replays (device time only), over the cells "
        "with one.\n\n",
        "| benchmark | kind | provider | baseline | timed cells | speedup (geomean) | min-max | largest case "
        "| median ms there | speedup there | peak MiB there | best % roofline | graph speedup (geomean) "
        "| skipped | failed |\n",
        "|---|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|\n",
    ]
    for s in summary:
        spread = "" if s["speedup_min"] is None else f"{s['speedup_min']:.2f}-{s['speedup_max']:.2f}"
        cells = [
            s["benchmark"], s["kind"], s["provider"], s["baseline"], f"{s['ok']}/{s['cells']}",
            _fmt(s["speedup_geomean"], ".2f"), spread, s["largest_case"], _fmt(s["median_ms_at_largest"], ".4f"),
            _fmt(s["speedup_at_largest"], ".2f"), _fmt(s["peak_mem_mib_at_largest"], ".1f"),
            _fmt(s["best_pct_roofline"], ".1f"),
            "" if not s["graph_cells"] else f"{s['graph_speedup_geomean']:.2f} ({s['graph_cells']})",
            s["skipped"], s["failed"],
        ]  # fmt: skip
        out.append("| " + " | ".join(_md_cell(c) for c in cells) + " |\n")
    skipped = skipped_baselines(data)
    if skipped:
        out.append("\n## Skipped baselines\n\n| benchmark | provider | cells | why |\n|---|---|---:|---|\n")
        for s in skipped:
            out.append(f"| {s['benchmark']} | {_md_cell(s['provider'])} | {s['cells']} | "
                       f"{_md_cell('; '.join(s['reasons']))} |\n")  # fmt: skip
    return "".join(out)


def _timing_source_line(data: dict) -> str:
    sources = sorted({b.get("timing_source") for b in data.get("benchmarks", {}).values() if b.get("timing_source")})
    if not sources:
        return ""
    if sources == [CUDA_EVENTS]:
        return "- Timing: CUDA events (median of many calls, L2 flushed between calls, inputs rotated)\n"
    return f"- **Timing source: {', '.join(sources)}. These numbers are not measurements of a GPU.**\n"


def render_markdown(data: dict) -> str:
    """``results.md`` from the ``results.json`` content."""
    out = ["# mmkernels benchmark results\n\n"]
    if not data.get("timed", False):
        out.append(f"**{data.get('not_timed_reason') or NOT_TIMED}**\n\n")
    out.append(_stamp_line(data.get("stamp", {})))
    out.append(_roofline_line(data.get("roofline")))
    out.append(_timing_source_line(data))
    out.append(_summary_markdown(data))
    for name, bench in _benchmarks_in_order(data):
        out.append(f"\n## {name}\n\n{bench.get('description', '')}\n\n")
        if bench.get("bytes_model"):
            out.append(f"Bytes counted for GB/s: {bench['bytes_model']}\n\n")
        if not bench.get("timed"):
            out.append(f"**{bench.get('not_timed_reason') or NOT_TIMED}**\n\n")
        for p in bench.get("providers", []):
            if p.get("notes"):
                out.append(f"- `{p['name']}`: {p['notes']}\n")
        graph = bool(bench.get("graph_timing"))
        if graph:
            out.append(
                "\nGraph columns: the device time alone, each call replayed from a CUDA graph (no host "
                "work, so no wait for it); the eager median includes whatever the GPU waited for the host.\n"
            )
        out.append("\n" + _table_header(graph))
        out.extend(_row_line(r, graph) for r in bench.get("rows", []))
        for key, title in (("plot", "effective bandwidth"), ("speedup_plot", "speedup vs size"),
                           ("roofline_plot", "roofline position")):  # fmt: skip
            plot = bench.get(key, "")
            if plot:
                out.append(f"\n![{name}: {title}]({plot})\n" if plot.endswith(".png") else f"\n{plot}\n")
    suite = data.get("suite")
    if suite:
        out.append("\n## GPU suite steps\n\n| step | status | seconds | budget s | detail |\n|---|---|---:|---:|---|\n")
        for step in suite.get("steps", []):
            out.append(
                f"| {step['name']} | {step['status']} | {step['seconds']:.1f} | {step['budget_s']:.0f} "
                f"| {_md_cell(step.get('detail', ''))} |\n"
            )
    return "".join(out)
