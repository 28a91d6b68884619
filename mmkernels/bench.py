"""``python -m mmkernels.bench`` / ``mmkernels bench``: run the benchmarks, write the results
folder, compare two runs.

    python -m mmkernels.bench [--kernels merge,patch_embed] [--models llava-1.5-7b,qwen2-vl-7b]
                              [--shapes SUBSTR,...] [--max-cases N] [--quick] [--dry-run] [--out DIR] [--list]
    python -m mmkernels.bench --compare A.json B.json [--threshold 0.05] [--fail-on-regression]

What runs: every benchmark registered by a ``benchmarks/bench_*.py`` module
(``benchmarks.harness.register``), or those named with ``--kernels`` / ``--models``
(``--benchmarks`` takes either kind); ``--shapes`` keeps the cases whose name contains
one of the comma-separated substrings, ``--max-cases N`` the first N of them. On CUDA each (case, provider) cell is checked
against the benchmark's oracle and timed (CUDA events, median); a progress bar runs on
stderr, a table is printed at the end, and the folder (default
``benchmarks/results/<GPU>-<date>-<commit>``) holds ``results.json``, ``results.md`` and
the PNG plots (see ``benchmarks/results/README.md``). The roofline (copy bandwidth,
bf16 matmul rate) is measured once per folder.

``--dry-run`` times nothing: every benchmark's shapes are built scaled down, every
provider is built and run once on the CPU against the oracle, host syncs are counted and
the results files are written marked "not timed". It hides CUDA and runs mmkernels'
kernels in Triton's interpreter (re-launching itself with ``TRITON_INTERPRET=1`` when
that was not set, since Triton reads it when kernels are decorated). Without CUDA and
without ``--dry-run`` the command refuses (exit 2): there is nothing to time.

``--compare A B`` (each a ``results.json`` or its folder) prints, per cell timed in both
runs, B's median over A's: a regression when B is slower by more than ``--threshold``
(default 5%), a speedup when faster. Runs from different GPUs are refused (exit 2), as
are runs that timed nothing. Exit codes: 0 done; 1 a regression with
``--fail-on-regression``; 2 refused (no CUDA, different devices, bad arguments);
3 some cell failed its correctness check.

``tools/gpu_suite.py`` runs each benchmark through this module (one process per
benchmark, with a time budget), so the suite and this command write the same files.

The ``benchmarks`` folder is part of the source checkout, not of the installed package:
this command runs from a checkout (an editable install, or ``python -m`` from its root).
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

__all__ = [
    "Comparison",
    "DeviceMismatch",
    "EXIT_FAILED_ROWS",
    "EXIT_REFUSED",
    "EXIT_REGRESSION",
    "compare_results",
    "default_out_dir",
    "format_comparison",
    "format_table",
    "load_results",
    "main",
    "run_benchmarks",
    "select_benchmarks",
]

EXIT_REGRESSION = 1
EXIT_REFUSED = 2
EXIT_FAILED_ROWS = 3
DEFAULT_THRESHOLD = 0.05
_REEXEC_ENV = "MMKERNELS_BENCH_REEXEC"


# ======================================================================================
# The checkout


def repo_root() -> Path:
    """The source checkout holding ``benchmarks/harness/`` (this file's parent's parent
    in a checkout or an editable install; else the working directory), put on
    ``sys.path`` so ``benchmarks`` imports. Raises ``RuntimeError`` when there is none."""
    for candidate in (Path(__file__).resolve().parent.parent, Path.cwd()):
        if (candidate / "benchmarks" / "harness" / "__init__.py").is_file():
            if str(candidate) not in sys.path:
                sys.path.insert(0, str(candidate))
            return candidate
    raise RuntimeError(
        "mmkernels bench needs the source checkout (its benchmarks/ folder is not installed): run it from "
        "the repository root, or install the checkout with `pip install -e .`"
    )


def _harness():
    repo_root()
    from benchmarks import harness

    return harness


def default_out_dir(stamp: dict, dry_run: bool, root: Path | None = None) -> Path:
    """``benchmarks/results/<GPU>-<date>-<commit>`` (``-dryrun`` appended for a dry run,
    ``-2``, ``-3``... when taken)."""
    harness = _harness()
    date = stamp.get("date", "")[:10] or datetime.date.today().isoformat()
    commit = stamp.get("git_commit", "unknown")
    short = commit[:7] if commit != "unknown" else "nogit"
    base = f"{harness.short_gpu_name(stamp)}-{date}-{short}" + ("-dryrun" if dry_run else "")
    root = root or repo_root() / "benchmarks" / "results"
    candidate, n = root / base, 2
    while candidate.exists():
        candidate, n = root / f"{base}-{n}", n + 1
    return candidate


# ======================================================================================
# Selection


def normalize_name(name: str) -> str:
    """A benchmark name as matched: case ignored, "_" and "-" alike."""
    return name.strip().lower().replace("_", "-")


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def select_benchmarks(registry: dict, *, kernels: Sequence[str] | None = None, models: Sequence[str] | None = None,
                      names: Sequence[str] | None = None) -> list:  # fmt: skip
    """The registrations to run: those named (``kernels`` of kind "kernel", ``models`` of
    kind "model", ``names`` of either; "-" and "_" alike, case ignored), or all when
    nothing is named. Raises ``ValueError`` naming an unknown name and what exists."""
    if not kernels and not models and not names:
        return sorted(registry.values(), key=lambda r: (r.kind != "kernel", r.name))  # kernels first
    chosen: dict[str, Any] = {}
    for wanted, kind in ((kernels, "kernel"), (models, "model"), (names, None)):
        pool = {normalize_name(n): r for n, r in registry.items() if kind is None or r.kind == kind}
        for name in wanted or ():
            reg = pool.get(normalize_name(name))
            if reg is None:
                what = f"{kind} benchmark" if kind else "benchmark"
                known = ", ".join(sorted(normalize_name(n) for n in pool)) or "none"
                raise ValueError(f"unknown {what} {name!r}; registered: {known}")
            chosen[reg.name] = reg
    return list(chosen.values())


def filter_cases(cases: Sequence[Any], shapes: Sequence[str] | None) -> list[Any]:
    """The cases whose name contains one of ``shapes`` (all when ``shapes`` is empty)."""
    if not shapes:
        return list(cases)
    return [c for c in cases if any(s in c.name for s in shapes)]


# ======================================================================================
# Progress and tables


class Progress:
    """A text progress bar on ``stream`` (cells done of all cells); one line per update
    when the stream is not a terminal (logs)."""

    def __init__(self, total: int, stream=None, width: int = 30):
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.started = time.monotonic()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, done: int, label: str) -> None:
        if done == self.done and self.done:
            return  # the harness reports a finished benchmark once more
        self.done = done
        frac = min(1.0, done / self.total)
        bar = "#" * int(frac * self.width) + "." * (self.width - int(frac * self.width))
        text = f"[{bar}] {done}/{self.total} cells {time.monotonic() - self.started:6.1f} s  {label}"
        if self.tty:
            self.stream.write("\r" + text[:160].ljust(160))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _short(text: str, n: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def format_table(data: dict) -> str:
    """Every cell of a results dict as a text table, then the per-provider summary."""
    harness = _harness()
    rows = []
    for name, bench in sorted(data.get("benchmarks", {}).items()):
        for r in bench.get("rows", []):
            rows.append([
                name, r["case"], r["provider"], r["status"], _fmt(r.get("median_ms"), ".4f"),
                _fmt(r.get("speedup"), ".2f"), _fmt(r.get("gbps"), ".1f"), _fmt(r.get("pct_roofline"), ".1f"),
                _fmt(r.get("peak_mem_mib"), ".1f"), "" if r.get("host_syncs") is None else str(r["host_syncs"]),
                _short(r.get("reason", "")) if r["status"] in ("skipped", "failed") else "",
            ])  # fmt: skip
    cells = _text_table(
        ["benchmark", "case", "provider", "status", "median ms", "speedup", "GB/s", "% roof", "peak MiB", "syncs",
         "why"], rows)  # fmt: skip
    summary = [
        [s["benchmark"], s["provider"], f"{s['ok']}/{s['cells']}", _fmt(s["speedup_geomean"], ".2f"),
         _fmt(s["speedup_at_largest"], ".2f"), s["largest_case"], str(s["skipped"]), str(s["failed"])]
        for s in harness.summarize(data)
    ]  # fmt: skip
    head = ["benchmark", "provider", "timed", "speedup geomean", "speedup at largest", "largest case", "skipped",
            "failed"]  # fmt: skip
    out = [cells, "", _text_table(head, summary)]
    if not data.get("timed"):
        out.append(f"\n{data.get('not_timed_reason') or 'not timed'}")
    return "\n".join(out)


# ======================================================================================
# Running


@dataclass
class RunOutcome:
    out_dir: Path
    data: dict
    results: list = field(default_factory=list)  # harness.BenchmarkResult per benchmark run
    skipped: dict = field(default_factory=dict)  # benchmark -> why it did not run

    @property
    def failed_rows(self) -> list:
        return [r for res in self.results for r in res.failed_rows]


def run_benchmarks(registrations: Sequence[Any], out_dir: str | os.PathLike, *, quick: bool = False,
                   dry_run: bool = False, shapes: Sequence[str] | None = None, max_cases: int | None = None,
                   timing_source=None,
                   device: str | None = None, stamp: dict | None = None, roofline=None,
                   progress: Progress | bool | None = None) -> RunOutcome:  # fmt: skip
    """Run ``registrations`` into ``out_dir``: stamp the folder, measure the roofline
    once (CUDA, not a dry run, unless given or already in the folder), run each
    benchmark's (filtered) cases, write JSON / Markdown / plots. ``dry_run``: validate on
    the CPU, time nothing. ``timing_source`` (tests): time with it on ``device``
    (default "cpu") instead of CUDA events. ``progress``: a :class:`Progress`, True for one
    on stderr, None/False for none."""
    harness = _harness()
    out_dir = Path(out_dir)
    folder = harness.ResultsFolder(out_dir)
    # A folder is one run on one machine: a stamp already there (the GPU suite takes it
    # before its steps) is kept; a given one replaces it.
    if stamp is not None or "stamp" not in folder.load():
        folder.update(stamp=stamp if stamp is not None else harness.device_stamp())
    timed = timing_source is not None or (not dry_run and harness.cuda_available())
    if dry_run:
        device, timing_source = "cpu", None
    elif timing_source is not None:
        device = device or "cpu"
    else:
        device = device or ("cuda" if harness.cuda_available() else "cpu")
    if timed and roofline is None and timing_source is None:
        roofline = harness.roofline_from_folder(out_dir, device)
        if roofline is None:
            roofline = harness.measure_roofline(device)
    if roofline is not None:
        folder.update(roofline=roofline)

    plan = []
    outcome = RunOutcome(out_dir=out_dir, data={})
    for reg in registrations:
        cases = filter_cases(reg.benchmark.cases_for(quick), shapes)[:max_cases]
        if not cases:
            outcome.skipped[reg.name] = f"no case matches --shapes {','.join(shapes or [])}"
            continue
        plan.append((reg, cases))
    total = sum(len(cases) * len(reg.benchmark.providers) for reg, cases in plan)
    bar = Progress(total) if progress is True else (progress or None)
    done_before = 0
    for reg, cases in plan:
        n_providers = len(reg.benchmark.providers)

        def on_case(partial, reg=reg, base=done_before):
            if bar is not None and partial.rows:
                bar.update(base + len(partial.rows), f"{reg.name}: {partial.rows[-1].case}")

        result = harness.run_into_folder(
            reg.benchmark, out_dir, quick=quick, cases=cases, device=device, roofline=roofline,
            timing_source=timing_source, on_case=on_case,
        )  # fmt: skip
        outcome.results.append(result)
        done_before += len(cases) * n_providers
    if bar is not None:
        bar.close()
    outcome.data = folder.load()
    return outcome


# ======================================================================================
# Compare


class DeviceMismatch(ValueError):
    """Two runs from different GPUs: their times are not comparable."""


@dataclass
class Comparison:
    a: str
    b: str
    device: str
    threshold: float
    cells: list[dict]  # benchmark, case, provider, a_ms, b_ms, ratio (b / a), verdict
    only_a: list[tuple[str, str, str]]
    only_b: list[tuple[str, str, str]]
    differences: list[str]  # stamp fields that differ (driver, versions): said, not refused

    @property
    def regressions(self) -> list[dict]:
        return [c for c in self.cells if c["verdict"] == "regression"]

    @property
    def speedups(self) -> list[dict]:
        return [c for c in self.cells if c["verdict"] == "speedup"]


def load_results(path: str | os.PathLike) -> dict:
    """A ``results.json`` (or the folder holding one) as a dict; ``ValueError`` naming the
    path when it is missing or not a results file."""
    import json

    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise ValueError(f"{path}: no results.json there")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or "benchmarks" not in data or "stamp" not in data:
        raise ValueError(f"{p}: not an mmkernels results file (no 'stamp' and 'benchmarks')")
    return data


def _timed_cells(data: dict) -> dict[tuple[str, str, str], float]:
    return {
        (name, r["case"], r["provider"]): r["median_ms"]
        for name, bench in data.get("benchmarks", {}).items()
        for r in bench.get("rows", [])
        if r.get("status") == "ok" and r.get("median_ms")
    }


def compare_results(a: dict, b: dict, *, threshold: float = DEFAULT_THRESHOLD, a_name: str = "A",
                    b_name: str = "B") -> Comparison:  # fmt: skip
    """Per cell timed in both runs: ``ratio = b_ms / a_ms``; "regression" when
    ``ratio > 1 + threshold``, "speedup" when ``ratio < 1 / (1 + threshold)``, else "same".

    Raises :class:`DeviceMismatch` when the runs' devices differ (``harness.device_key``)
    and ``ValueError`` when either timed nothing or their timing sources differ.
    """
    harness = _harness()
    if threshold < 0:
        raise ValueError(f"threshold: expected >= 0, got {threshold}")
    key_a, key_b = harness.device_key(a.get("stamp", {})), harness.device_key(b.get("stamp", {}))
    if key_a != key_b:
        raise DeviceMismatch(
            f"refusing to compare runs from different devices: {a_name} ran on {key_a!r}, {b_name} on {key_b!r}; "
            "times from different GPUs are not regressions or speedups"
        )
    cells_a, cells_b = _timed_cells(a), _timed_cells(b)
    for name, cells in ((a_name, cells_a), (b_name, cells_b)):
        if not cells:
            raise ValueError(f"{name} has no timed cells (a dry run, or no CUDA device): nothing to compare")
    src_a, src_b = a.get("timing_sources", []), b.get("timing_sources", [])
    if src_a != src_b:
        raise ValueError(f"timing sources differ: {a_name} {src_a}, {b_name} {src_b}")
    rows = []
    for key in sorted(cells_a.keys() & cells_b.keys()):
        ratio = cells_b[key] / cells_a[key]
        verdict = "regression" if ratio > 1 + threshold else "speedup" if ratio < 1 / (1 + threshold) else "same"
        rows.append({"benchmark": key[0], "case": key[1], "provider": key[2], "a_ms": cells_a[key],
                     "b_ms": cells_b[key], "ratio": ratio, "verdict": verdict})  # fmt: skip
    stamp_a, stamp_b = a.get("stamp", {}), b.get("stamp", {})
    differences = []
    for field_name in ("torch", "triton", "transformers", "git_commit"):
        if stamp_a.get(field_name) != stamp_b.get(field_name):
            differences.append(f"{field_name}: {stamp_a.get(field_name)} -> {stamp_b.get(field_name)}")
    for field_name in ("driver", "power_limit_w", "max_sm_clock_mhz"):
        va, vb = stamp_a.get("gpu", {}).get(field_name), stamp_b.get("gpu", {}).get(field_name)
        if va != vb:
            differences.append(f"gpu {field_name}: {va} -> {vb}")
    return Comparison(
        a=a_name, b=b_name, device=key_a, threshold=threshold, cells=rows,
        only_a=sorted(cells_a.keys() - cells_b.keys()), only_b=sorted(cells_b.keys() - cells_a.keys()),
        differences=differences,
    )  # fmt: skip


def format_comparison(c: Comparison) -> str:
    rows = [
        [x["benchmark"], x["case"], x["provider"], f"{x['a_ms']:.4f}", f"{x['b_ms']:.4f}",
         f"{(x['ratio'] - 1) * 100:+.1f}%", x["verdict"].upper() if x["verdict"] == "regression" else x["verdict"]]
        for x in c.cells
    ]  # fmt: skip
    out = [
        f"compare on {c.device}: A = {c.a}, B = {c.b}; change = B median / A median - 1; threshold "
        f"{c.threshold * 100:.1f}%",
        _text_table(["benchmark", "case", "provider", "A ms", "B ms", "change", "verdict"], rows),
        "",
        f"{len(c.regressions)} regression(s), {len(c.speedups)} speedup(s), "
        f"{len(c.cells) - len(c.regressions) - len(c.speedups)} within the threshold, of {len(c.cells)} cells "
        "timed in both runs",
    ]
    if c.regressions:
        worst = max(c.regressions, key=lambda x: x["ratio"])
        out.append(f"worst regression: {worst['benchmark']} / {worst['case']} / {worst['provider']}: "
                   f"{worst['a_ms']:.4f} -> {worst['b_ms']:.4f} ms ({(worst['ratio'] - 1) * 100:+.1f}%)")  # fmt: skip
    for label, keys in (("only in A", c.only_a), ("only in B", c.only_b)):
        if keys:
            out.append(f"{label}: " + ", ".join("/".join(k) for k in keys))
    if c.differences:
        out.append("stamps differ (not refused): " + "; ".join(c.differences))
    return "\n".join(out)


# ======================================================================================
# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mmkernels.bench",
        description="Run mmkernels' benchmarks into a results folder, or compare two runs.",
        epilog="Exit codes: 0 done; 1 a regression with --fail-on-regression; 2 refused; 3 a cell failed its "
        "correctness check.",
    )
    parser.add_argument("--kernels", help="comma-separated kernel benchmarks (e.g. merge,patch_embed)")
    parser.add_argument("--models", help="comma-separated model benchmarks (e.g. llava-1.5-7b,qwen2-vl-7b)")
    parser.add_argument("--benchmarks", help="comma-separated benchmarks of either kind")
    parser.add_argument("--shapes", help="keep the cases whose name contains one of these comma-separated substrings")
    parser.add_argument("--max-cases", type=int, help="at most this many cases per benchmark (after --shapes)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    parser.add_argument("--dry-run", action="store_true", help="validate everything on the CPU; nothing is timed")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<GPU>-<date>-<commit>)")
    parser.add_argument("--list", action="store_true", help="list the registered benchmarks and their cases")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-table", action="store_true", help="do not print the table at the end")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two results.json (or folders)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help="relative change that counts as a regression or speedup (default 0.05)")  # fmt: skip
    parser.add_argument("--fail-on-regression", action="store_true", help="exit 1 when --compare finds a regression")
    return parser


def _compare_main(args) -> int:
    try:
        a, b = load_results(args.compare[0]), load_results(args.compare[1])
        comparison = compare_results(a, b, threshold=args.threshold, a_name=args.compare[0], b_name=args.compare[1])
    except DeviceMismatch as exc:
        print(f"mmkernels bench --compare: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except ValueError as exc:
        print(f"mmkernels bench --compare: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    print(format_comparison(comparison))
    return EXIT_REGRESSION if args.fail_on_regression and comparison.regressions else 0


def _list_main(registry: dict, errors: dict) -> int:
    for name, reg in registry.items():
        bench = reg.benchmark
        print(f"{name} ({reg.kind}; size: {reg.size_label or 'declared bytes'}; providers: "
              f"{', '.join(p.name for p in bench.providers)})")  # fmt: skip
        quick = {c.name for c in bench.cases_for(True)}
        for case in bench.cases:
            print(f"  {case.name}{'  [quick]' if case.name in quick else ''}")
    for module, why in errors.items():
        print(f"{module}: not importable: {why}")
    return 0


def _reexec_for_dry_run(argv: Sequence[str]) -> int | None:
    """A dry run needs Triton's interpreter, which is read when kernels are decorated (at
    import, before this code ran): run again in a child with it on and CUDA hidden."""
    if os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get(_REEXEC_ENV):
        return None
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", **{_REEXEC_ENV: "1"})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo_root()), env.get("PYTHONPATH", "")) if p)
    print("mmkernels bench: dry run: re-running with TRITON_INTERPRET=1 and CUDA hidden", file=sys.stderr, flush=True)
    return subprocess.run([sys.executable, "-m", "mmkernels.bench", *argv], env=env).returncode


def main(argv: Sequence[str] | None = None, *, timing_source=None, stamp: dict | None = None) -> int:
    """``python -m mmkernels.bench ARGS``. ``timing_source`` and ``stamp`` are for tests
    (a deterministic timer and a stand-in device stamp); the command line never sets them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        harness = _harness()
    except RuntimeError as exc:
        print(f"mmkernels bench: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    if args.compare:
        return _compare_main(args)
    if args.max_cases is not None and args.max_cases < 1:
        print(f"mmkernels bench: --max-cases: expected at least 1, got {args.max_cases}", file=sys.stderr)
        return EXIT_REFUSED
    if args.threshold != DEFAULT_THRESHOLD or args.fail_on_regression:
        print("mmkernels bench: --threshold and --fail-on-regression go with --compare", file=sys.stderr)
        return EXIT_REFUSED
    if args.dry_run and timing_source is None:
        code = _reexec_for_dry_run(argv)
        if code is not None:
            return code

    registry, errors = harness.discover()
    if args.list:
        return _list_main(registry, errors)
    try:
        chosen = select_benchmarks(registry, kernels=_split(args.kernels), models=_split(args.models),
                                   names=_split(args.benchmarks))  # fmt: skip
    except ValueError as exc:
        print(f"mmkernels bench: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    for module, why in errors.items():
        print(f"mmkernels bench: {module} not importable, its benchmarks are not run: {why}", file=sys.stderr)
    if not args.dry_run and timing_source is None and not harness.cuda_available():
        print(
            "mmkernels bench: no CUDA device here, so nothing can be timed. Run it on a GPU machine, or pass "
            "--dry-run to validate every benchmark on the CPU (results marked 'not timed').",
            file=sys.stderr,
        )
        return EXIT_REFUSED
    # Adding to a folder that has a stamp (the GPU suite's): keep its run's stamp.
    folder_stamp = harness.ResultsFolder(args.out).load().get("stamp") if args.out is not None else None
    given_stamp = stamp if stamp is not None else (None if folder_stamp else harness.device_stamp())
    stamp = given_stamp or folder_stamp
    out_dir = (args.out if args.out is not None else default_out_dir(stamp, args.dry_run)).resolve()
    print(f"mmkernels bench: {', '.join(r.name for r in chosen)} on {harness.device_key(stamp)} -> {out_dir}",
          file=sys.stderr, flush=True)  # fmt: skip
    outcome = run_benchmarks(
        chosen, out_dir, quick=args.quick, dry_run=args.dry_run, shapes=_split(args.shapes), max_cases=args.max_cases,
        timing_source=timing_source, stamp=given_stamp, progress=not args.no_progress,
    )  # fmt: skip
    for name, why in outcome.skipped.items():
        print(f"mmkernels bench: {name}: {why}", file=sys.stderr)
    if not args.no_table:
        print(format_table(outcome.data))
    for row in outcome.failed_rows:
        print(f"FAILED {row.benchmark} / {row.case} / {row.provider}: {row.reason}", file=sys.stderr)
    counts: dict[str, int] = {}
    for res in outcome.results:
        for row in res.rows:
            counts[row.status] = counts.get(row.status, 0) + 1
    print(f"mmkernels bench: {', '.join(f'{n} {s}' for s, n in sorted(counts.items())) or 'no cells'}; results in "
          f"{out_dir}", flush=True)  # fmt: skip
    return EXIT_FAILED_ROWS if outcome.failed_rows else 0


def cli(argv: Sequence[str] | None = None) -> int:
    """The ``mmkernels`` console script: ``mmkernels bench ARGS`` (this module) and
    ``mmkernels tune ARGS`` (:mod:`mmkernels.tune`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: mmkernels {bench,tune} [ARGS]   (mmkernels bench --help, mmkernels tune --help for the arguments)")
        return 0 if argv else EXIT_REFUSED
    if argv[0] == "tune":
        from mmkernels import tune

        return tune.main(argv[1:])
    if argv[0] != "bench":
        print(f"mmkernels: unknown command {argv[0]!r}; commands: bench, tune", file=sys.stderr)
        return EXIT_REFUSED
    return main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
