#!/usr/bin/env python3
"""The GPU suite: one command for a lent H100/H200, finished inside 9 minutes.

    python tools/gpu_suite.py [--out DIR] [--quick] [--dry-run] [--benchmarks NAME,...]
                              [--budget SECONDS]

Steps, in order; each has a time budget, runs in its own process (a hang or a crash
costs that step only), and is recorded in the summary however it ends:

1. ``stamp``: the device stamp (GPU name, driver, clocks, power limit via nvidia-ml-py;
   torch / triton / transformers versions, git commit, date, host).
2. ``roofline``: device-to-device copy bandwidth and bf16 8192^3 matmul rate, measured
   once; the benchmarks read it from the folder for their "% of roofline" columns.
3. ``gpu-tests``: ``pytest -m gpu tests/`` with ``MMK_TEST_GPU=1`` (compiled kernels),
   in up to 8 pytest-xdist processes sharing the GPU when xdist is installed (the time
   goes to compiling kernels, one CPU core each); JUnit XML and the log (a line per
   test) go into the folder. ``--tests-budget`` fixes its seconds.
4. ``bench:<name>``: every benchmark registered by a ``benchmarks/bench_*.py`` module
   (kernel microbenchmarks and model-level benchmarks), each run by the same code as
   ``python -m mmkernels.bench --benchmarks <name> --out DIR`` in its own process.
5. ``probe``: ``tools/gpu_probe.py`` into ``probe/``: host vs device microseconds per
   call of each op (CUDA-graph replay) and tile sweeps of the GEMM kernels, at most 60 s
   (taken before the benchmarks' share; with ``--benchmarks`` only when
   ``--probe-budget`` is given); ``--probe-budget`` fixes its seconds (the sweep
   compiles each config it times: a few seconds each).
6. ``tune``: ``mmkernels tune --benchmark-shapes --quick`` (at most 60 s, whole suites
   only) writes ``routes.json`` into the folder: every route of the four ops timed at
   the benchmark shapes, the fastest kept (the standard PyTorch path is a candidate). The benchmarks run after it with that table; commit it
   as ``mmkernels/tables/routes.json`` (the shipped table) with the results.
7. ``plots``: every benchmark's plots and the Markdown summary redrawn from
   ``results.json`` (a step stopped by its budget leaves rows but no plots).

On the lent GPU machines only 8 files come back from ``$OUT``: tar the folder into one
file there (``tar czf $OUT/results.tgz -C /tmp r``) rather than copying its files.

Budget: 540 s in all (``--budget`` sets another total, for a lease with less time left), of which 30 s are kept for teardown and the summary. Roofline gets
at most 45 s, the GPU tests at most 180 s (less when the benchmarks would otherwise get
under 90 s each, but never less than 40% of what is left: with many benchmarks each gets
less), and the benchmarks share what is left equally, in order (kernels, then models;
time one leaves unused goes to the next). A benchmark stops
starting new shapes 20 s before its budget ends and has written its results after every
shape, so a step cut short still leaves rows. A step over budget is stopped (SIGINT,
then SIGTERM, then SIGKILL to its process group) and recorded as ``timeout``.

Everything lands in one folder, by default ``benchmarks/results/<GPU>-<date>-<commit>``
(e.g. ``benchmarks/results/H100-2026-11-24-abc1234``): ``results.json``,
``results.md`` (summary, skipped baselines by name, a table per benchmark), three PNGs
per benchmark (bandwidth or latency, speedup vs size, roofline position),
``gpu-tests.junit.xml`` and one log per step. ``benchmarks/results/README.md`` explains
the files.

Without a CUDA device the suite refuses (exit code 2) unless ``--dry-run``: then every
step runs on the CPU (the benchmarks validate the harness and write "not timed", the
GPU tests are only collected, kernels run in Triton's interpreter) into a folder whose
name ends in ``-dryrun``. Exit code 0 when every step succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # a CLI run from anywhere: `benchmarks`, `mmkernels`

TOTAL_BUDGET_S = 540.0
FINISH_MARGIN_S = 30.0
ROOFLINE_CAP_S = 45.0
GPU_TESTS_CAP_S = 180.0
MIN_BENCH_S = 90.0
BENCH_SHARE_CAP = 0.6  # of the budget left before the roofline: at most this is held back for benchmarks
BENCH_GRACE_S = 20.0
EXIT_NO_CUDA = 2
EXIT_ROWS_FAILED = 3


# ======================================================================================
# Budget and steps


class Budget:
    """Seconds left of the suite's total, after the finishing margin."""

    def __init__(self, total_s: float = TOTAL_BUDGET_S, margin_s: float = FINISH_MARGIN_S):
        self.started = time.monotonic()
        self.total_s = total_s
        self.margin_s = margin_s

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def remaining(self) -> float:
        return max(0.0, self.total_s - self.margin_s - self.elapsed())

    def allot(self, cap_s: float, reserve_s: float = 0.0) -> float:
        """At most ``cap_s``, leaving ``reserve_s`` for the steps after this one."""
        return max(0.0, min(cap_s, self.remaining() - reserve_s))

    def allot_step(self, asked_s: float | None, cap_s: float, reserve_s: float) -> float:
        """A step's seconds: ``asked_s`` when the command line fixed them (within what is
        left, whatever the later steps would want), else :meth:`allot` of ``cap_s``."""
        return self.allot(asked_s) if asked_s is not None else self.allot(cap_s, reserve_s=reserve_s)


@dataclass
class StepResult:
    name: str
    status: str  # "ok" | "failed" | "timeout" | "skipped"
    seconds: float
    budget_s: float
    detail: str = ""
    log: str = ""


def _log_name(step: str) -> str:
    return step.replace(":", "-").replace("/", "-") + ".log"


def _terminate_group(proc: subprocess.Popen) -> None:
    """Stop a step's process group: SIGINT (pytest writes its reports), SIGTERM, SIGKILL."""
    for sig, wait_s in ((signal.SIGINT, 15), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_process_step(name: str, cmd: list[str], *, budget_s: float, out_dir: Path, env: dict) -> tuple[StepResult, int | None]:
    """Run ``cmd`` (its own process group, output to the step's log) within ``budget_s``."""
    log_name = _log_name(name)
    started = time.monotonic()
    if budget_s <= 1.0:
        return StepResult(name, "skipped", 0.0, budget_s, "no time left in the suite's budget"), None
    with open(out_dir / log_name, "w") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:
            _terminate_group(proc)
            seconds = time.monotonic() - started
            return StepResult(name, "timeout", seconds, budget_s, f"stopped after {budget_s:.0f} s", log_name), None
        except BaseException:
            _terminate_group(proc)
            raise
    seconds = time.monotonic() - started
    status = "ok" if rc == 0 else "failed"
    detail = "" if rc == 0 else f"exit code {rc}; last lines: {_tail(out_dir / log_name)}"
    return StepResult(name, status, seconds, budget_s, detail, log_name), rc


def _tail(path: Path, lines: int = 3, chars: int = 400) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return ""
    joined = " / ".join(text)
    return joined[-chars:]


def step_env(*, dry_run: bool, interpret: bool = False, gpu_tests: bool = False, deadline: float | None = None) -> dict:
    """The environment of a step's process.

    On a GPU: kernels compiled (``TRITON_INTERPRET`` removed), and ``MMK_TEST_GPU=1`` for
    the GPU tests (tests/conftest.py otherwise turns the interpreter on). Dry run: CUDA
    hidden (the CPU path is validated even on a GPU machine), kernels interpreted.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("TRITON_INTERPRET", None)
    env.pop("MMK_TEST_GPU", None)
    if dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
        if interpret:
            env["TRITON_INTERPRET"] = "1"
    elif gpu_tests:
        env["MMK_TEST_GPU"] = "1"
    if deadline is not None:
        env["MMKERNELS_BENCH_DEADLINE"] = f"{deadline:.3f}"
    return env


def _self_cmd(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "_step", *args]


# ======================================================================================
# GPU tests


def junit_summary(path: Path) -> dict:
    """Counts (and up to 20 failing test ids) from a JUnit XML file."""
    if not path.exists():
        return {"junit": "missing"}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return {"junit": f"unreadable: {exc}"}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failing = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in root.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return {**counts, "failing": failing[:20]}


GPU_TEST_WORKERS = 8


def gpu_tests_command(junit: Path, *, dry_run: bool, workers: int) -> list[str]:
    """The GPU tests' pytest command. Most of their time is Triton compiling each kernel
    variant (CPU work, one core per process), so ``workers`` processes (pytest-xdist)
    share the one GPU; ``-v`` puts one line per test in the log, so a run stopped by its
    budget still shows which tests passed (the JUnit file is written only at the end)."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/", "-p", "no:cacheprovider", "-rfEs"]
    if dry_run:
        return cmd + ["-q", "--collect-only"]
    cmd += ["-v", f"--junitxml={junit}", "--durations=10"]
    return cmd + (["-n", str(workers)] if workers > 1 else [])


def _xdist_workers() -> int:
    import importlib.util

    if importlib.util.find_spec("xdist") is None:
        return 1
    return max(1, min(GPU_TEST_WORKERS, (os.cpu_count() or 2) // 2))


def run_gpu_tests(out_dir: Path, *, budget_s: float, dry_run: bool) -> StepResult:
    junit = out_dir / "gpu-tests.junit.xml"
    cmd = gpu_tests_command(junit, dry_run=dry_run, workers=1 if dry_run else _xdist_workers())
    env = step_env(dry_run=dry_run, gpu_tests=True)
    step, rc = run_process_step("gpu-tests", cmd, budget_s=budget_s, out_dir=out_dir, env=env)
    if rc == 5:  # pytest: no tests collected
        step.status, step.detail = "ok", "no tests marked gpu were collected"
    if dry_run and step.status == "ok" and rc == 0:
        step.detail = "dry run: GPU tests collected, not run"
    elif not dry_run:
        summary = junit_summary(junit)
        counts = ", ".join(f"{k} {v}" for k, v in summary.items() if k != "failing")
        failing = "; failing: " + ", ".join(summary["failing"]) if summary.get("failing") else ""
        step.detail = "; ".join(x for x in (step.detail, counts + failing) if x)
        if step.status == "ok" and summary.get("tests") and summary.get("skipped") == summary["tests"]:
            step.status = "failed"
            step.detail = "every GPU test was skipped (are CUDA and compiled kernels visible?); " + step.detail
    return step


# ======================================================================================
# Steps run in their own process (`gpu_suite.py _step ...`)


def _step_roofline(out_dir: Path, quick: bool) -> int:
    from benchmarks import harness

    roofline = harness.measure_roofline("cuda", quick=quick) if harness.cuda_available() else harness.Roofline.not_measured(
        f"not measured: {harness.NO_CUDA}"
    )
    harness.ResultsFolder(out_dir).update(roofline=roofline)
    print(json.dumps(roofline.to_dict()))
    return 0


def step_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gpu_suite.py _step")
    parser.add_argument("kind", choices=["roofline"])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    return _step_roofline(args.out, args.quick)


# ======================================================================================
# The suite


def discover_benchmarks() -> list[str]:
    """The registered benchmarks' names (kernels first, then models; by name within)."""
    from benchmarks import harness

    registry, errors = harness.discover()
    for module, why in errors.items():
        print(f"gpu_suite: {module} not importable, its benchmarks are not run: {why}", file=sys.stderr)
    return [name for name, reg in sorted(registry.items(), key=lambda kv: (kv[1].kind != "kernel", kv[0]))]


def default_out_dir(stamp: dict, dry_run: bool) -> Path:
    from mmkernels import bench

    return bench.default_out_dir(stamp, dry_run)


def _bench_step(name: str, out_dir: Path, *, budget: Budget, benches_left: int, quick: bool, dry_run: bool) -> StepResult:
    """``python -m mmkernels.bench --benchmarks NAME --out DIR`` within its share of the budget."""
    budget_s = budget.allot(budget.remaining() / max(benches_left, 1))
    grace = min(BENCH_GRACE_S, 0.25 * budget_s)
    deadline = time.time() + budget_s - grace
    cmd = [sys.executable, "-m", "mmkernels.bench", "--benchmarks", name, "--out", str(out_dir), "--no-table",
           *(["--quick"] if quick else []), *(["--dry-run"] if dry_run else [])]  # fmt: skip
    env = step_env(dry_run=dry_run, interpret=True, deadline=deadline)
    if (out_dir / "routes.json").is_file():
        env["MMKERNELS_CACHE_DIR"] = str(out_dir)  # the routes the tune step chose
    step, rc = run_process_step("bench:" + name, cmd, budget_s=budget_s, out_dir=out_dir, env=env)
    if rc == EXIT_ROWS_FAILED:
        step.detail = "rows failed their correctness check; " + step.detail
    elif rc == 0:
        step.detail = _tail(out_dir / step.log, lines=1)
    return step


def bench_reserve_s(n_benches: int, remaining_s: float) -> float:
    """Seconds held back for the benchmarks while the roofline and the GPU tests run:
    ``MIN_BENCH_S`` each, but never more than ``BENCH_SHARE_CAP`` of what is left (with
    many benchmarks the GPU tests would otherwise get nothing)."""
    return min(MIN_BENCH_S * n_benches, BENCH_SHARE_CAP * remaining_s)


SERVE_VLLM_CAP_S = 150.0
PROBE_CAP_S = 60.0
TUNE_CAP_S = 60.0


def tune_step(out_dir: Path, *, budget_s: float, dry_run: bool) -> StepResult:
    """``mmkernels tune --benchmark-shapes --quick`` into ``routes.json`` in the results
    folder: every route of each op timed at the benchmark shapes, the winners kept. The
    benchmarks after it run with that table (``MMKERNELS_CACHE_DIR`` = the folder); commit
    it as ``mmkernels/tables/routes.json``, the shipped table, with the results."""
    if dry_run:
        return StepResult("tune", "skipped", 0.0, 0.0, "dry run: tuning times routes on a CUDA device")
    cmd = [sys.executable, "-m", "mmkernels.tune", "--benchmark-shapes", "--quick", "--table", str(out_dir / "routes.json"),
           "--budget", f"{max(budget_s - 20.0, 1.0):.0f}"]  # fmt: skip
    step, rc = run_process_step("tune", cmd, budget_s=budget_s, out_dir=out_dir, env=step_env(dry_run=False))
    if rc == 0:
        step.detail = _tail(out_dir / step.log, lines=1)
    return step


def runs_probe(only: list[str] | None, probe_budget_s: float | None) -> bool:
    """The probe runs in a whole suite, and with ``--benchmarks`` only when
    ``--probe-budget`` asks for it (a chosen few benchmarks plus the sweeps: a short
    lease's run)."""
    return only is None or probe_budget_s is not None


def probe_step(out_dir: Path, *, budget_s: float, dry_run: bool) -> StepResult:
    """``tools/gpu_probe.py``: why the ops take the time they take (host vs device per
    call, tile sweeps); its own output folder ``probe/`` inside the results folder."""
    if dry_run:
        return StepResult("probe", "skipped", 0.0, 0.0, "dry run: the probe needs a CUDA device")
    cmd = [sys.executable, str(REPO_ROOT / "tools" / "gpu_probe.py"), "--out", str(out_dir / "probe"),
           "--budget", f"{max(budget_s - 15.0, 1.0):.0f}"]  # fmt: skip
    step, _ = run_process_step("probe", cmd, budget_s=budget_s, out_dir=out_dir, env=step_env(dry_run=False))
    return step


def serve_vllm_step(out_dir: Path, *, budget: Budget, dry_run: bool) -> StepResult:
    """The end-to-end serving benchmark (``benchmarks/serve_vllm.py``: ``vllm serve`` with
    the plugin off and on, ``vllm bench serve --dataset-name random-mm``), when vLLM is
    installed and ``MMK_SERVE_MODEL`` names a local model folder (GPU machines reach no
    hub); skipped by name otherwise."""
    import importlib.util

    name = "serve-vllm"
    if importlib.util.find_spec("vllm") is None:
        return StepResult(name, "skipped", 0.0, 0.0, "vLLM is not installed")
    model = os.environ.get("MMK_SERVE_MODEL")
    if not model:
        return StepResult(name, "skipped", 0.0, 0.0, "set MMK_SERVE_MODEL to a local model folder to serve")
    if dry_run:
        return StepResult(name, "skipped", 0.0, 0.0, "dry run: nothing is served")
    cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / "serve_vllm.py"), "--model", model,
           "--out", str(out_dir / "serve_vllm")]  # fmt: skip
    step, _ = run_process_step(name, cmd, budget_s=budget.allot(SERVE_VLLM_CAP_S), out_dir=out_dir,
                               env=step_env(dry_run=False))  # fmt: skip
    return step


def render_step(out_dir: Path) -> StepResult:
    """Redraw every benchmark's plots and the Markdown from ``results.json``."""
    from benchmarks import harness

    started = time.monotonic()
    try:
        data = harness.ResultsFolder(out_dir).render()
    except Exception as exc:  # the JSON is written already; plots are a view of it
        return StepResult("plots", "failed", time.monotonic() - started, 0.0, f"{type(exc).__name__}: {exc}")
    n = len(data.get("benchmarks", {}))
    return StepResult("plots", "ok", time.monotonic() - started, 0.0, f"plots and summary of {n} benchmarks redrawn")


def take_stamp() -> tuple[dict, StepResult]:
    from benchmarks import harness

    started = time.monotonic()
    try:
        stamp = harness.device_stamp()
    except Exception as exc:  # record and go on: the other steps stamp nothing themselves
        stamp = {"gpu": {"name": "unknown", "nvml": "not queried"}, "cuda_available": True,
                 "git_commit": harness.git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}
        return stamp, StepResult("stamp", "failed", time.monotonic() - started, 0.0, f"{type(exc).__name__}: {exc}")
    gpu = stamp.get("gpu", {})
    detail = f"{gpu.get('name')}; NVML {gpu.get('nvml')}; commit {stamp.get('git_commit', 'unknown')[:12]}"
    return stamp, StepResult("stamp", "ok", time.monotonic() - started, 0.0, detail)


def run_suite(out_dir: Path, *, quick: bool, dry_run: bool, stamp: dict, stamp_step: StepResult,
              budget: Budget, only: list[str] | None = None, tests_budget_s: float | None = None,
              probe_budget_s: float | None = None) -> list[StepResult]:  # fmt: skip
    from benchmarks import harness

    folder = harness.ResultsFolder(out_dir)
    steps: list[StepResult] = [stamp_step]
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    def record(status: str) -> None:
        folder.update(suite={
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "dry_run": dry_run, "quick": quick, "budget_s": budget.total_s, "started": started,
            "elapsed_s": round(budget.elapsed(), 1), "status": status,
            "steps": [dataclasses.asdict(s) for s in steps],
        })  # fmt: skip

    folder.update(stamp=stamp)
    record("running")
    benches = discover_benchmarks()
    if only is not None:
        from mmkernels.bench import normalize_name

        unknown = sorted({normalize_name(n) for n in only} - {normalize_name(b) for b in benches})
        if unknown:
            steps.append(StepResult("benchmarks", "failed", 0.0, 0.0, f"unknown benchmarks: {', '.join(unknown)}; "
                                    f"registered: {', '.join(benches)}"))  # fmt: skip
        benches = [b for b in benches if normalize_name(b) in {normalize_name(n) for n in only}]
    bench_reserve = bench_reserve_s(len(benches), budget.remaining())

    roofline_cap = ROOFLINE_CAP_S * (0.7 if quick else 1.0)
    step, _ = run_process_step(
        "roofline",
        _self_cmd("roofline", "--out", str(out_dir), *(["--quick"] if quick else [])),
        budget_s=budget.allot(roofline_cap, reserve_s=bench_reserve),
        out_dir=out_dir,
        env=step_env(dry_run=dry_run),
    )
    roof = folder.load().get("roofline") or {}
    if roof.get("copy_gbps"):
        step.detail = f"copy {roof['copy_gbps']:.0f} GB/s, bf16 matmul {roof['matmul_tflops']:.0f} TFLOP/s"
    elif step.status == "ok":
        step.detail = roof.get("reason", "")
    steps.append(step)
    record("running")

    tests_s = budget.allot_step(tests_budget_s, GPU_TESTS_CAP_S * (0.5 if quick else 1.0), bench_reserve)
    steps.append(run_gpu_tests(out_dir, budget_s=tests_s, dry_run=dry_run))
    record("running")
    if runs_probe(only, probe_budget_s):
        probe_s = budget.allot_step(probe_budget_s, PROBE_CAP_S, bench_reserve)
        steps.append(probe_step(out_dir, budget_s=probe_s, dry_run=dry_run))
        record("running")

    if only is None:
        steps.append(tune_step(out_dir, budget_s=budget.allot(TUNE_CAP_S, reserve_s=bench_reserve), dry_run=dry_run))
        record("running")

    for i, name in enumerate(benches):
        steps.append(_bench_step(name, out_dir, budget=budget, benches_left=len(benches) - i, quick=quick, dry_run=dry_run))
        record("running")
    if not benches:
        steps.append(StepResult("benchmarks", "skipped", 0.0, 0.0, "no benchmark registered by benchmarks/bench_*.py"))
    record("running")
    if only is None:
        steps.append(serve_vllm_step(out_dir, budget=budget, dry_run=dry_run))
        record("running")
    steps.append(render_step(out_dir))
    record("ok" if all(s.status in ("ok", "skipped") for s in steps) else "failed")
    return steps


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_step"]:
        return step_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/<GPU>-<date>-<commit>)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    parser.add_argument("--dry-run", action="store_true", help="validate everything on the CPU; nothing is timed")
    parser.add_argument("--benchmarks", help="comma-separated benchmarks to run (default: every registered one)")
    parser.add_argument("--budget", type=float, default=TOTAL_BUDGET_S,
                        help=f"seconds for the whole suite, the finishing margin included (default {TOTAL_BUDGET_S:.0f})")
    parser.add_argument("--tests-budget", type=float,
                        help="seconds for the GPU tests, taken before the benchmarks' share (0 skips them); "
                             "default: the suite's own split")
    parser.add_argument("--probe-budget", type=float,
                        help=f"seconds for the GPU probe, taken before the benchmarks' share (0 skips it); "
                             f"default: at most {PROBE_CAP_S:.0f}")
    args = parser.parse_args(argv)

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu_suite: no CUDA device here, so nothing can be timed. Run it on a GPU machine, or pass "
            "--dry-run to validate the suite on the CPU (results marked 'not timed').",
            file=sys.stderr,
        )
        return EXIT_NO_CUDA

    if args.budget <= FINISH_MARGIN_S:
        parser.error(f"--budget must exceed the {FINISH_MARGIN_S:.0f} s finishing margin, got {args.budget:g}")
    budget = Budget(total_s=args.budget)
    stamp, stamp_step = take_stamp()
    out_dir = (args.out if args.out is not None else default_out_dir(stamp, args.dry_run)).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"gpu_suite: {stamp['gpu'].get('name')} -> {out_dir}", flush=True)
    only = [n.strip() for n in (args.benchmarks or "").split(",") if n.strip()] or None
    steps = run_suite(out_dir, quick=args.quick, dry_run=args.dry_run, stamp=stamp, stamp_step=stamp_step, budget=budget,
                      only=only, tests_budget_s=args.tests_budget, probe_budget_s=args.probe_budget)  # fmt: skip
    for s in steps:
        print(f"  {s.name:16s} {s.status:8s} {s.seconds:6.1f} s / {s.budget_s:5.0f} s  {s.detail}", flush=True)
    print(f"gpu_suite: results in {out_dir}", flush=True)
    return 0 if all(s.status in ("ok", "skipped") for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
