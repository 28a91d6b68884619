"""The performance-story pipeline end to end, without a GPU.

A deterministic timing source stands in for CUDA events: every (benchmark, case,
provider) cell gets a median that is a known function of its size and provider, so the
rows, speedups, summary table, plots and ``--compare`` are checked against numbers
computed here. The real benchmarks run (their inputs, providers and oracles, at their
CPU scale); only the clock is fake, and the results say so. ``--dry-run`` is run as the
command line runs it (a separate process, re-launching itself with the interpreter).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # `benchmarks` is a top-level folder, not installed

from benchmarks import harness  # noqa: E402
from mmkernels import bench as cli  # noqa: E402
from bench_helpers import env_without_cuda_or_interpreter  # noqa: E402

REGISTRY, IMPORT_ERRORS = harness.discover()

# Relative cost per provider: speedup over the baseline must come out as 1 / factor.
FACTORS = {
    "hf": 1.0, "vllm-style": 0.8, "torch.compile(reference)": 0.5, "mmkernels": 0.25, "mmkernels(check)": 0.4,
    "hf-eager": 1.0, "torch.compile(hf)": 0.5, "unfold+linear": 0.625, "mmkernels(uint8)": 0.2,
    "torch.compile": 0.8,
}  # fmt: skip
FAKE_SOURCE = "fake (test)"
GRAPH_FACTORS = {"mmkernels": 0.05, "mmkernels(uint8)": 0.05}  # of the size, like FACTORS


class FakeTiming:
    """median = 1 ms per 1,000 size units x the provider's factor; peak memory = the
    median in MiB x 10 (any deterministic, distinct numbers would do)."""

    name = FAKE_SOURCE

    def __init__(self, slower: dict | None = None):
        self.slower = slower or {}
        self.timed: list[tuple[str, str, str]] = []
        self.graphed: list[tuple[str, str, str]] = []

    @staticmethod
    def size(session, case) -> float:
        reg = REGISTRY[session.bench.name]
        value = case.params().get(reg.size_param) if reg.size_param else None
        return float(value or session.bench.bytes_moved(case))

    def ms(self, session, case, provider) -> float:
        base = self.size(session, case) / 1000.0 * FACTORS[provider.name]
        return base * self.slower.get((case.name, provider.name), 1.0)

    def time(self, session, case, provider, fn, arg_sets):
        self.timed.append((session.bench.name, case.name, provider.name))
        ms = self.ms(session, case, provider)
        return harness.Timing(median_ms=ms, p20_ms=0.9 * ms, p80_ms=1.1 * ms, runs=10, warmup_runs=2)

    def time_graph(self, session, case, provider, fn, arg_sets, check_inputs):
        """Replays: half the eager time, a tenth for mmkernels' (its eager time is the host's)."""
        self.graphed.append((session.bench.name, case.name, provider.name))
        ms = self.size(session, case) / 1000.0 * GRAPH_FACTORS.get(provider.name, 0.5 * FACTORS[provider.name])
        return harness.Timing(median_ms=ms, p20_ms=0.9 * ms, p80_ms=1.1 * ms, runs=10, warmup_runs=2), fn(check_inputs)

    def peak_memory(self, session, case, provider, fn, inputs):
        return int(self.ms(session, case, provider) * 10 * 2**20)


def _fake_stamp(gpu_name: str = "NVIDIA H100 80GB HBM3") -> dict:
    return {
        "gpu": {"name": gpu_name, "nvml": "ok", "driver": "580.65.06", "sm_clock_mhz": 1980,
                "max_sm_clock_mhz": 1980, "memory_clock_mhz": 2619, "max_memory_clock_mhz": 2619,
                "power_limit_w": 700.0, "memory_total_gib": 80.0},
        "cuda_available": True, "torch": "2.11.0", "torch_cuda": "13.0", "triton": "3.6.0",
        "transformers": "5.17.0", "python": "3.11", "git_commit": "abc1234def", "date": "2026-11-30T23:00:00+00:00",
        "hostname": "fake",
    }  # fmt: skip


FAKE_ROOFLINE = harness.Roofline(copy_gbps=3000.0, matmul_tflops=800.0, device_name="NVIDIA H100 80GB HBM3",
                                 copy_bytes=2 * 2**30, matmul_size=8192)  # fmt: skip

# Per benchmark, the cases the fake run uses (scaled to CPU size; names keep the real
# case name so the table reads like a real one).
FAKE_CASES = {
    "merge": ("qwen2-vl-7b/1x1img-224", "llava-1.5-7b/1x1img", "llava-1.5-7b/16x1img"),
    "patch_embed": ("qwen2-vl-7b/256p", "clip-l-14-336/b8", "clip-l-14-336/b256"),
    "llava-1.5-7b": ("llava-1.5-7b/1img",),
}
ABSENT = harness.Provider("flash-attn", lambda: None, requires=lambda: "flash-attn not installed", optional=True)


def _cpu_timed_provider(p: harness.Provider) -> harness.Provider:
    # On the CPU the compiled-kernel backend check cannot hold (the interpreter runs) and
    # inductor's CPU compile is slow: time what the CPU check runs. The fake clock makes
    # the numbers; the providers still run and are checked against the oracle.
    return dataclasses.replace(p, factory=p.check_factory or p.factory, timed_backend=None)


def _fake_registrations() -> list[harness.Registration]:
    regs = []
    for name, case_names in FAKE_CASES.items():
        reg = REGISTRY[name]
        by_name = {c.name: c for c in reg.benchmark.cases}
        cases = tuple(dataclasses.replace(by_name[n].scaled(), name=n) for n in case_names)
        providers = tuple(_cpu_timed_provider(p) for p in reg.benchmark.providers)
        if reg.kind == "kernel" and name == "merge":
            providers += (ABSENT,)
        bench = dataclasses.replace(reg.benchmark, cases=cases, quick_cases=None, providers=providers)
        regs.append(dataclasses.replace(reg, benchmark=bench))
    return regs


def _expected_size(name: str, case_name: str) -> float:
    reg = REGISTRY[name]
    case = next(c for c in reg.benchmark.cases if c.name == case_name).scaled()
    return float(case.params()[reg.size_param])


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fake-run") / "H100-fake"
    timing = FakeTiming()
    outcome = cli.run_benchmarks(_fake_registrations(), out, timing_source=timing, stamp=_fake_stamp(),
                                 roofline=FAKE_ROOFLINE, progress=False)  # fmt: skip
    return outcome, out, timing


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height of a valid PNG (signature, IHDR with its CRC, IEND); raises otherwise."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name}: not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    ihdr = data[16 : 16 + 13]
    (crc,) = struct.unpack(">I", data[29:33])
    assert crc == zlib.crc32(b"IHDR" + ihdr), f"{path.name}: IHDR CRC mismatch"
    assert data[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82", f"{path.name}: no IEND"
    return struct.unpack(">II", ihdr[:8])


# --------------------------------------------------------------------------------------
# Registry and selection


def test_registry_holds_kernels_and_models():
    assert not IMPORT_ERRORS, IMPORT_ERRORS
    kinds = {name: reg.kind for name, reg in REGISTRY.items()}
    mine = {"merge": "kernel", "patch_embed": "kernel", "llava-1.5-7b": "model", "qwen2-vl-7b": "model"}
    assert mine.items() <= kinds.items()
    assert REGISTRY["merge"].size_param == "tokens" and REGISTRY["patch_embed"].size_param == "M"
    picked = cli.select_benchmarks(REGISTRY, kernels=["patch-embed"], models=["LLaVA_1.5_7b"])
    assert [r.name for r in picked] == ["patch_embed", "llava-1.5-7b"]
    everything = [r.name for r in cli.select_benchmarks(REGISTRY)]
    assert sorted(everything) == sorted(REGISTRY) and everything.index("patch_embed") < everything.index("llava-1.5-7b")
    with pytest.raises(ValueError, match="unknown kernel benchmark 'llava-1.5-7b'.*merge"):
        cli.select_benchmarks(REGISTRY, kernels=["llava-1.5-7b"])  # a model is not a kernel
    cases = REGISTRY["merge"].benchmark.cases
    assert [c.name for c in cli.filter_cases(cases, ["64x1img", "1x1img-224"])] == [
        "qwen2-vl-7b/1x1img-224", "llava-1.5-7b/64x1img"]  # fmt: skip


def test_registering_a_new_benchmark_is_one_call(monkeypatch):
    monkeypatch.setattr(harness.providers, "_REGISTRY", dict(harness.providers._REGISTRY))
    bench = dataclasses.replace(REGISTRY["merge"].benchmark, name="quantized_linear")
    assert harness.register(bench, size_param="M", module="benchmarks.bench_quantized_linear") is bench
    assert harness.registered()["quantized_linear"].kind == "kernel"
    with pytest.raises(ValueError, match="already registered by benchmarks.bench_quantized_linear"):
        harness.register(bench, module="benchmarks.bench_other")
    with pytest.raises(ValueError, match="kind"):
        harness.register(bench, kind="layer", module="benchmarks.bench_quantized_linear")


# --------------------------------------------------------------------------------------
# A full run from the fake timing source


def test_rows_and_speedups_come_from_the_fake_times(fake_run):
    outcome, out, timing = fake_run
    data = json.loads((out / "results.json").read_text())
    assert set(data["benchmarks"]) == set(FAKE_CASES)
    assert data["timed"] is True and data["timing_sources"] == [FAKE_SOURCE]
    for name, case_names in FAKE_CASES.items():
        bench = data["benchmarks"][name]
        assert bench["timing_source"] == FAKE_SOURCE and bench["kind"] == REGISTRY[name].kind
        providers = [p["name"] for p in bench["providers"]]
        rows = {(r["case"], r["provider"]): r for r in bench["rows"]}
        assert set(rows) == {(c, p) for c in case_names for p in providers}
        for case in case_names:
            size = _expected_size(name, case)
            for provider in providers:
                row = rows[(case, provider)]
                if provider == "flash-attn":
                    assert row["status"] == "skipped" and row["reason"] == "flash-attn not installed"
                    continue
                assert row["status"] == "ok" and row["correct"] is True, (case, provider, row["reason"])
                ms = size / 1000.0 * FACTORS[provider]
                assert row["median_ms"] == pytest.approx(ms)
                assert row["speedup"] == pytest.approx(1.0 / FACTORS[provider])
                assert row["peak_mem_mib"] == pytest.approx(int(ms * 10 * 2**20) / 2**20)
                if row["bytes"]:
                    assert row["gbps"] == pytest.approx(row["bytes"] / (ms * 1e-3) / 1e9)
                    floor = harness.roofline_floor_ms(row["bytes"], row["flops"], FAKE_ROOFLINE)
                    assert row["pct_roofline"] == pytest.approx(100 * floor / ms)
    # every timed cell went through the injected source, none through CUDA events
    assert len(timing.timed) == sum(
        1 for b in data["benchmarks"].values() for r in b["rows"] if r["status"] == "ok"
    )


def test_graph_columns_come_from_the_fake_replays(fake_run):
    """patch_embed times its cells from CUDA graphs too (merge and the models do not)."""
    _, out, timing = fake_run
    data = json.loads((out / "results.json").read_text())
    assert data["benchmarks"]["patch_embed"]["graph_timing"] is True
    assert data["benchmarks"]["merge"]["graph_timing"] is False
    assert {b for b, _, _ in timing.graphed} == {"patch_embed"}
    rows = {(r["case"], r["provider"]): r for r in data["benchmarks"]["patch_embed"]["rows"]}
    for case in FAKE_CASES["patch_embed"]:
        size = _expected_size("patch_embed", case)
        base_ms = size / 1000.0 * 0.5
        for provider in ("hf-eager", "unfold+linear", "mmkernels", "mmkernels(uint8)"):
            row = rows[(case, provider)]
            assert row["graph_note"] == "", (case, provider, row["graph_note"])
            ms = size / 1000.0 * GRAPH_FACTORS.get(provider, 0.5 * FACTORS[provider])
            assert row["graph_median_ms"] == pytest.approx(ms)
            assert row["graph_speedup"] == pytest.approx(base_ms / ms)
            floor = harness.roofline_floor_ms(row["bytes"], row["flops"], FAKE_ROOFLINE)
            assert row["graph_pct_roofline"] == pytest.approx(100 * floor / ms)
    assert all(r.get("graph_median_ms") is None for r in data["benchmarks"]["merge"]["rows"])
    summary = {(s["benchmark"], s["provider"]): s for s in harness.summarize(data)}
    assert summary[("patch_embed", "mmkernels")]["graph_speedup_geomean"] == pytest.approx(10.0)
    assert summary[("patch_embed", "mmkernels")]["speedup_geomean"] == pytest.approx(4.0)
    md = (out / "results.md").read_text()
    patch_section = md.split("\n## patch_embed\n", 1)[1].split("\n## ", 1)[0]
    merge_section = md.split("\n## merge\n", 1)[1].split("\n## ", 1)[0]
    assert "graph ms" in patch_section and "graph ms" not in merge_section


def test_sizes_and_summary_match_the_fake_times(fake_run):
    _, out, _ = fake_run
    data = json.loads((out / "results.json").read_text())
    merge = data["benchmarks"]["merge"]
    sizes = {r["case"]: harness.row_size(merge, r) for r in merge["rows"]}
    assert sizes == {c: _expected_size("merge", c) for c in FAKE_CASES["merge"]}
    summary = {(s["benchmark"], s["provider"]): s for s in harness.summarize(data)}
    mm = summary[("merge", "mmkernels")]
    assert mm["ok"] == 3 and mm["baseline"] == "hf" and mm["speedup_geomean"] == pytest.approx(4.0)
    assert mm["largest_case"] == "llava-1.5-7b/16x1img" and mm["speedup_at_largest"] == pytest.approx(4.0)
    assert summary[("patch_embed", "mmkernels(uint8)")]["speedup_geomean"] == pytest.approx(5.0)
    assert summary[("llava-1.5-7b", "torch.compile")]["speedup_geomean"] == pytest.approx(1.25)
    assert summary[("merge", "flash-attn")]["skipped"] == 3 and summary[("merge", "flash-attn")]["ok"] == 0
    assert data["skipped_baselines"] == [
        {"benchmark": "merge", "provider": "flash-attn", "cells": 3, "reasons": ["flash-attn not installed"]}
    ]


def test_summary_markdown_has_the_rows_and_says_the_times_are_fake(fake_run):
    _, out, _ = fake_run
    md = (out / "results.md").read_text()
    assert "Timing source: fake (test). These numbers are not measurements of a GPU." in md
    assert "## Summary" in md and "## Skipped baselines" in md
    summary_block = md.split("## Summary", 1)[1].split("## Skipped baselines", 1)[0]
    lines = [ln for ln in summary_block.splitlines() if ln.startswith("| merge | kernel | mmkernels |")]
    assert len(lines) == 1
    cells = [c.strip() for c in lines[0].strip("|").split("|")]
    assert cells[3] == "hf" and cells[4] == "3/3" and cells[5] == "4.00" and cells[6] == "4.00-4.00"
    assert cells[7] == "llava-1.5-7b/16x1img"
    assert "| merge | flash-attn | 3 | flash-attn not installed |" in md
    assert "| llava-1.5-7b | model | mmkernels | hf-eager | 1/1 | 1.00 |" not in md  # factor 0.25: 4.00
    assert "| llava-1.5-7b | model | mmkernels | hf-eager | 1/1 | 4.00 |" in md
    for name in FAKE_CASES:
        assert f"![{name}: speedup vs size]({name}-speedup.png)" in md


def test_folder_layout_and_plots_are_valid_pngs(fake_run):
    _, out, _ = fake_run
    expected = {"results.json", "results.md"}
    for name, reg in ((n, REGISTRY[n]) for n in FAKE_CASES):
        expected |= {f"{name}.png", f"{name}-speedup.png"}
        if reg.kind == "kernel":
            expected.add(f"{name}-roofline.png")
    assert {p.name for p in out.iterdir()} == expected
    for png in sorted(out.glob("*.png")):
        width, height = _png_size(png)
        assert width >= 400 and height >= 200 and png.stat().st_size > 5000, png.name
    data = json.loads((out / "results.json").read_text())
    assert data["benchmarks"]["merge"]["roofline_plot"] == "merge-roofline.png"
    assert "roofline_plot" not in data["benchmarks"]["llava-1.5-7b"]


def test_plots_draw_the_points_they_are_given(tmp_path):
    """The speedup plot of a benchmark with timed rows differs from the one without:
    the figure is drawn from the data, not a placeholder."""
    data = harness.ResultsFolder(tmp_path).load()
    rows = [{"case": f"c{i}", "provider": p, "status": "ok", "median_ms": 1.0, "speedup": s, "bytes": 10**i,
             "flops": 0, "gbps": 1.0, "params": {"n": 10**i}} for i in range(1, 4) for p, s in (("a", 1.0), ("b", 2.0))]  # fmt: skip
    bench = {"benchmark": "x", "size_param": "n", "providers": [{"name": "a"}, {"name": "b"}], "rows": rows}
    assert harness.plot_speedup(bench, tmp_path / "with.png") is None
    assert harness.plot_speedup({**bench, "rows": []}, tmp_path / "without.png") is None
    assert _png_size(tmp_path / "with.png") != _png_size(tmp_path / "without.png")
    assert data["benchmarks"] == {}


# --------------------------------------------------------------------------------------
# --compare


def _with_planted_changes(data: dict) -> dict:
    b = copy.deepcopy(data)
    for r in b["benchmarks"]["merge"]["rows"]:
        if (r["case"], r["provider"]) == ("llava-1.5-7b/1x1img", "mmkernels"):
            r["median_ms"] *= 1.5  # the planted regression
        if (r["case"], r["provider"]) == ("qwen2-vl-7b/1x1img-224", "hf"):
            r["median_ms"] /= 2.0  # a planted speedup
        if (r["case"], r["provider"]) == ("llava-1.5-7b/16x1img", "vllm-style"):
            r["median_ms"] *= 1.03  # under the 5% threshold
    return b


def test_compare_flags_the_planted_regression(fake_run, tmp_path, capsys):
    _, out, _ = fake_run
    a = json.loads((out / "results.json").read_text())
    b = _with_planted_changes(a)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.json").write_text(json.dumps(b))
    c = cli.compare_results(a, b)
    assert [(x["case"], x["provider"]) for x in c.regressions] == [("llava-1.5-7b/1x1img", "mmkernels")]
    assert c.regressions[0]["ratio"] == pytest.approx(1.5)
    assert [(x["case"], x["provider"]) for x in c.speedups] == [("qwen2-vl-7b/1x1img-224", "hf")]
    timed = sum(1 for bn in a["benchmarks"].values() for r in bn["rows"] if r["status"] == "ok")
    assert len(c.cells) == timed and not c.only_a and not c.only_b

    assert cli.main(["--compare", str(out / "results.json"), str(tmp_path / "b")]) == 0
    printed = capsys.readouterr().out
    line = next(ln for ln in printed.splitlines() if "llava-1.5-7b/1x1img" in ln and " mmkernels " in ln)
    assert "+50.0%" in line and "REGRESSION" in line
    assert "1 regression(s), 1 speedup(s)" in printed
    # the `mmkernels` console script (`mmkernels bench ...`) is the same command
    assert cli.cli(["bench", "--compare", str(out), str(tmp_path / "b"), "--fail-on-regression"]) == cli.EXIT_REGRESSION
    assert cli.cli(["serve"]) == cli.EXIT_REFUSED
    capsys.readouterr()
    assert cli.main(["--compare", str(out), str(tmp_path / "b"), "--threshold", "0.6", "--fail-on-regression"]) == 0


def test_compare_refuses_different_devices_and_untimed_runs(fake_run, tmp_path, capsys):
    _, out, _ = fake_run
    a = json.loads((out / "results.json").read_text())
    other = copy.deepcopy(a)
    other["stamp"] = _fake_stamp("NVIDIA A100-SXM4-80GB")
    with pytest.raises(cli.DeviceMismatch, match="H100 80GB HBM3.*A100-SXM4-80GB"):
        cli.compare_results(a, other)
    (tmp_path / "a100.json").write_text(json.dumps(other))
    assert cli.main(["--compare", str(out / "results.json"), str(tmp_path / "a100.json")]) == cli.EXIT_REFUSED
    err = capsys.readouterr()
    assert "refusing to compare runs from different devices" in err.err and err.out == ""

    untimed = copy.deepcopy(a)
    for bench in untimed["benchmarks"].values():
        for r in bench["rows"]:
            r["status"], r["median_ms"] = harness.NOT_TIMED, None
    with pytest.raises(ValueError, match="no timed cells"):
        cli.compare_results(a, untimed)
    (tmp_path / "junk.json").write_text("{}")
    assert cli.main(["--compare", str(out), str(tmp_path / "junk.json")]) == cli.EXIT_REFUSED
    assert "not an mmkernels results file" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# The command line: refusal without CUDA, and --dry-run over every benchmark


def test_cli_refuses_to_time_without_cuda(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(harness, "cuda_available", lambda: False)
    assert cli.main(["--kernels", "merge", "--out", str(tmp_path / "x")]) == cli.EXIT_REFUSED
    assert "--dry-run" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert cli.main(["--kernels", "attention"]) == cli.EXIT_REFUSED
    assert "unknown kernel benchmark 'attention'" in capsys.readouterr().err
    assert cli.main(["--max-cases", "0", "--dry-run"]) == cli.EXIT_REFUSED
    assert cli.main(["--threshold", "0.1"]) == cli.EXIT_REFUSED  # goes with --compare
    assert "go with --compare" in capsys.readouterr().err


def test_dry_run_exercises_every_benchmark(tmp_path):
    """What CI runs: every registered benchmark, one case each (``--shapes``), built,
    every provider run on the CPU against its oracle, files written, nothing timed."""
    out = tmp_path / "dry"
    proc = subprocess.run(
        [sys.executable, "-m", "mmkernels.bench", "--dry-run", "--quick", "--max-cases", "1", "--out", str(out)],
        capture_output=True, text=True, env=env_without_cuda_or_interpreter(), timeout=300, cwd=REPO_ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "re-running with TRITON_INTERPRET=1" in proc.stderr
    data = json.loads((out / "results.json").read_text())
    with_a_case = {n for n, reg in REGISTRY.items() if reg.benchmark.cases_for(True)}
    assert {"merge", "patch_embed", "llava-1.5-7b", "qwen2-vl-7b"} <= with_a_case
    assert set(data["benchmarks"]) == with_a_case
    assert data["timed"] is False and "not timed: no CUDA device" in data["not_timed_reason"]
    for name, bench in data["benchmarks"].items():
        assert [r["case"] for r in bench["rows"]][:1] == [REGISTRY[name].benchmark.cases_for(True)[0].name]
        assert len({r["case"] for r in bench["rows"]}) == 1, name
        providers = [p.name for p in REGISTRY[name].benchmark.providers]
        assert [r["provider"] for r in bench["rows"]][: len(providers)] == providers
        assert bench["rows"][0]["status"] == harness.NOT_TIMED and bench["rows"][0]["correct"] is True, name
        for r in bench["rows"]:
            assert r["median_ms"] is None and r["speedup"] is None
            if r["status"] == "skipped":  # a provider that cannot run on a CPU says why, by name
                assert r["reason"], (name, r["provider"])
                continue
            assert r["status"] == harness.NOT_TIMED and r["correct"] is True, (name, r["provider"], r["reason"])
            if name in ("merge", "patch_embed", "llava-1.5-7b", "qwen2-vl-7b") and r["provider"].startswith("mmkernels"):
                assert "triton-interpreter" in r["backend"], (name, r["provider"], r["backend"])
    md = (out / "results.md").read_text()
    assert "not timed: no CUDA device" in md and "| llava-1.5-7b | model | mmkernels | hf-eager | 0/1 |" in md
    assert re.search(r"mmkernels bench: \d+ not timed(, \d+ skipped)?; results in ", proc.stdout)
    for name in with_a_case:
        assert _png_size(out / f"{name}-speedup.png")[0] > 0


# --------------------------------------------------------------------------------------
# The results page


def _load_results_page():
    import importlib.util

    name = "results_page_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "tools" / "results_page.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_results_page_says_when_there_are_no_results(tmp_path):
    page = _load_results_page()
    text = page.render(tmp_path, tmp_path / "RESULTS.md")
    assert "No GPU results are committed yet" in text and "## " not in text
    # the committed page is the generated one (regenerate with python tools/results_page.py)
    assert page.main(["--check"]) == 0


def test_results_page_shows_only_cuda_event_runs(fake_run, tmp_path):
    """A fake-timed folder is listed as not shown; the same folder stamped as a CUDA-event
    run is shown per device with its summary numbers and its plots."""
    import shutil

    page = _load_results_page()
    _, out, _ = fake_run
    root = tmp_path / "results"
    shutil.copytree(out, root / "H100-fake")
    shutil.copytree(out, root / "H100-2026-11-30-abc1234")
    real = json.loads((root / "H100-2026-11-30-abc1234" / "results.json").read_text())
    real["timing_sources"] = [harness.CUDA_EVENTS]
    for bench in real["benchmarks"].values():
        bench["timing_source"] = harness.CUDA_EVENTS
    (root / "H100-2026-11-30-abc1234" / "results.json").write_text(json.dumps(real))
    (root / "nogpu-2026-11-30-abc1234-dryrun").mkdir()
    (root / "nogpu-2026-11-30-abc1234-dryrun" / "results.json").write_text(json.dumps(
        {"stamp": {"cuda_available": False}, "benchmarks": {}, "suite": {"dry_run": True}}))  # fmt: skip

    assert page.main(["--results", str(root)]) == 0
    text = (root / "RESULTS.md").read_text()
    assert "## NVIDIA H100 80GB HBM3 (80 GiB)" in text
    assert "| merge | mmkernels | hf | 3/3 | 4.00 | llava-1.5-7b/16x1img |" in text
    assert "![merge: merge-speedup.png](H100-2026-11-30-abc1234/merge-speedup.png)" in text
    assert "- `H100-fake`: timing source fake (test) (only CUDA-event timings are results)" in text
    assert "dryrun" not in text  # a dry run is never a result, not even a line
    assert "Skipped baselines: merge / `flash-attn` (flash-attn not installed)" in text
    assert page.main(["--results", str(root), "--check"]) == 0
    (root / "RESULTS.md").write_text("edited by hand\n")
    assert page.main(["--results", str(root), "--check"]) == 1
