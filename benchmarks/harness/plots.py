"""Plots of a results folder (matplotlib, when installed): GB/s per provider and case
(:func:`plot_benchmark`), speedup against size (:func:`plot_speedup`) and the roofline
position (:func:`plot_roofline`); :data:`PLOTS` names them."""

from __future__ import annotations

from pathlib import Path

from .common import NOT_TIMED
from .report import row_size, size_label


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        return None, f"plot not written: matplotlib not installed ({exc})"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, ""


def _empty_figure(plt, title: str, text: str):
    fig, ax = plt.subplots(figsize=(8.0, 2.5))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    ax.set_title(title)
    return fig


def _save(fig, plt, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_benchmark(bench: dict, roofline: dict | None, path: Path) -> str | None:
    """Bars of GB/s per provider, grouped by case; the measured copy bandwidth as a line.
    Without timings the figure says why. Returns None, or why no plot was written."""
    plt, problem = _pyplot()
    if plt is None:
        return problem
    metric, ylabel, what = "gbps", "GB/s (declared bytes / median time)", "effective bandwidth"
    rows = [r for r in bench.get("rows", []) if r.get(metric) is not None]
    if not rows and any(r.get("median_ms") is not None for r in bench.get("rows", [])):
        # no declared bytes (a model-level benchmark, a bus-speed copy): the latency itself
        metric, ylabel, what = "median_ms", "median latency, ms", "median latency"
        rows = [r for r in bench.get("rows", []) if r.get(metric) is not None]
    cases = list(dict.fromkeys(r["case"] for r in bench.get("rows", [])))
    providers = [p["name"] for p in bench.get("providers", [])] or list(dict.fromkeys(r["provider"] for r in rows))
    title = f"{bench.get('benchmark', '')}: {what}"
    if not rows:
        fig = _empty_figure(plt, title, f"{bench.get('benchmark', '')}\n{bench.get('not_timed_reason') or NOT_TIMED}")
        _save(fig, plt, path)
        return None
    fig, ax = plt.subplots(figsize=(max(8.0, 1.2 * len(cases) + 3), 5.0))
    width = 0.8 / max(len(providers), 1)
    by_cell = {(r["case"], r["provider"]): r[metric] for r in rows}
    for j, provider in enumerate(providers):
        xs = [i + (j - (len(providers) - 1) / 2) * width for i in range(len(cases))]
        ys = [by_cell.get((c, provider), 0.0) for c in cases]
        ax.bar(xs, ys, width=width, label=provider)
    if metric == "gbps" and roofline and roofline.get("copy_gbps"):
        ax.axhline(roofline["copy_gbps"], color="black", linestyle="--", linewidth=1, label="measured copy BW")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.set_title(title)
    _save(fig, plt, path)
    return None


def plot_speedup(bench: dict, path: Path) -> str | None:
    """Speedup over the baseline against the benchmark's main size (log x), a line per
    provider through its timed cells in size order; the baseline as a dashed line at 1."""
    plt, problem = _pyplot()
    if plt is None:
        return problem
    name = bench.get("benchmark", "")
    title = f"{name}: speedup vs {size_label(bench)}"
    points: dict[str, list[tuple[float, float]]] = {}
    for r in bench.get("rows", []):
        size = row_size(bench, r)
        if r.get("status") == "ok" and r.get("speedup") and size:
            points.setdefault(r["provider"], []).append((size, r["speedup"]))
    if not points:
        fig = _empty_figure(plt, title, f"{name}\n{bench.get('not_timed_reason') or 'no timed cells'}")
        _save(fig, plt, path)
        return None
    providers = [p["name"] for p in bench.get("providers", [])]
    fig, ax = plt.subplots(figsize=(8.0, 5.0))
    for provider in [p for p in providers if p in points] + [p for p in points if p not in providers]:
        xy = sorted(points[provider])
        ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=provider)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter

    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel(size_label(bench) + " (log)")
    ax.set_ylabel(f"speedup over {providers[0] if providers else 'the baseline'} (log)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    _save(fig, plt, path)
    return None


def plot_roofline(bench: dict, roofline: dict | None, path: Path) -> str | None:
    """Each timed cell under the roofline measured in the run. With declared FLOPs: a
    classic roofline (TFLOP/s against FLOPs per byte, log-log; the roof is
    min(matmul rate, copy BW x intensity)); without (a pure data-movement kernel):
    GB/s against the bytes moved, under the measured copy bandwidth."""
    plt, problem = _pyplot()
    if plt is None:
        return problem
    name = bench.get("benchmark", "")
    rows = [r for r in bench.get("rows", []) if r.get("status") == "ok" and r.get("median_ms")]
    roof = roofline or {}
    measured = roof.get("copy_gbps") is not None
    title = f"{name}: roofline position"
    if rows and not any(r.get("bytes") or r.get("flops") for r in rows):
        fig = _empty_figure(plt, title, f"{name}\nno declared bytes or FLOPs: no roofline")
        _save(fig, plt, path)
        return None
    if not rows or not measured:
        why = bench.get("not_timed_reason") or ("" if measured else roof.get("reason") or "roofline not measured")
        fig = _empty_figure(plt, title, f"{name}\n{why or 'no timed cells'}")
        _save(fig, plt, path)
        return None
    providers = list(dict.fromkeys([p["name"] for p in bench.get("providers", [])] + [r["provider"] for r in rows]))
    fig, ax = plt.subplots(figsize=(8.0, 5.0))
    with_flops = any(r.get("flops") for r in rows)
    if with_flops:
        xs_all = [r["flops"] / r["bytes"] for r in rows if r.get("flops") and r.get("bytes")]
        knee = roof["matmul_tflops"] * 1e3 / roof["copy_gbps"]  # FLOPs per byte where the roof turns flat
        lo, hi = min(min(xs_all), knee) / 4, max(max(xs_all), knee) * 4
        grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
        ax.plot(grid, [min(roof["matmul_tflops"], roof["copy_gbps"] * x / 1e3) for x in grid], color="black",
                linewidth=1.5, label="measured roof")  # fmt: skip
        for provider in providers:
            pts = [(r["flops"] / r["bytes"], r["tflops"]) for r in rows
                   if r["provider"] == provider and r.get("flops") and r.get("bytes") and r.get("tflops")]  # fmt: skip
            if pts:
                ax.scatter([x for x, _ in pts], [y for _, y in pts], label=provider, s=30)
        ax.set_xlabel("arithmetic intensity (declared FLOPs / declared bytes, log)")
        ax.set_ylabel("TFLOP/s (log)")
    else:
        ax.axhline(roof["copy_gbps"], color="black", linewidth=1.5, label="measured copy BW")
        for provider in providers:
            pts = [(r["bytes"], r["gbps"]) for r in rows if r["provider"] == provider and r.get("gbps")]
            if pts:
                ax.scatter([x for x, _ in pts], [y for _, y in pts], label=provider, s=30)
        ax.set_xlabel("declared bytes moved (log)")
        ax.set_ylabel("GB/s (log)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    _save(fig, plt, path)
    return None


PLOTS = (
    ("plot", "{name}.png", lambda bench, roof, path: plot_benchmark(bench, roof, path)),
    ("speedup_plot", "{name}-speedup.png", lambda bench, roof, path: plot_speedup(bench, path)),
    ("roofline_plot", "{name}-roofline.png", lambda bench, roof, path: plot_roofline(bench, roof, path)),
)
