#!/usr/bin/env python3
"""GPU probe: where mmkernels' time goes on a real GPU, to steer the next tuning step.

    python tools/gpu_probe.py --out DIR [--budget SECONDS] [--parts launch,host,sweep]

The benchmarks (``python -m mmkernels.bench``) say how fast each op is against its
alternatives; this says why. Three parts, each written to ``DIR/probe.json`` and
``DIR/probe.md`` as it finishes:

* ``host``: per op and real shape, the microseconds per call spent on the host (N calls
  enqueued back to back with no synchronization, divided by N, the GPU far behind) and
  on the device (the same call captured once in a CUDA graph and replayed: no Python, no
  launch overhead), plus the eager median with CUDA events. ``host_us > device_us``
  means the op is host-bound at that size: a faster kernel would not show. The five
  functions with the most own time under cProfile are listed for the smallest case.
* ``launch``: Triton's own cost per launch on this host: an empty one-argument kernel,
  and each launch the ops make in the host cases (captured with its real arguments and
  replayed alone, N launches enqueued with no synchronization); ``F.linear`` of the same
  size as the cuBLAS yardstick.
* ``sweep``: the tile configurations of the two GEMM kernels (patch_embed,
  quantized_linear) on real shapes, each config's call captured in a CUDA graph and its
  replays timed (device time only, L2 flushed between them; median), with each op's own
  config function replaced, the default marked. Round robin over the cases: every
  default, then every first alternative (patch_embed's default tiles with another A
  source: packed patches against the one-launch gather, for CLIP x 64 and for one
  SigLIP image, either side of the row threshold; quantized_linear's other tile
  layout), then the tile variants; each config compiles on first use (seconds), so the
  budget decides how far it gets. A configuration that fails to compile or run is
  recorded with the error, never dropped.

Needs a CUDA device (exit 2 otherwise). Inputs come from the benchmarks' own registries
(``benchmarks/bench_*.py``), so shapes and providers are the ones the suite times.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import io
import json
import pstats
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

# (benchmark, case, provider): small cases first within each op, where host cost shows.
HOST_CASES = (
    ("merge", "qwen2-vl-7b/1x1img-224", "mmkernels"),
    ("merge", "llava-1.5-7b/64x1img", "mmkernels"),
    ("patch_embed", "siglip-so400m-14-384/b1", "mmkernels"),
    ("patch_embed", "qwen2-vl-7b/256p", "mmkernels"),
    ("patch_embed", "clip-l-14-336/b64", "mmkernels"),
    ("quantized_linear", "llava-1.5-7b/linear_1/m16", "mmkernels(w8a16)"),
    ("quantized_linear", "llava-1.5-7b/linear_1/m16", "mmkernels(w4a16)"),
    ("quantized_linear", "llava-1.5-7b/linear_1/m16", "mmkernels(fp8)"),
    ("quantized_linear", "llava-1.5-7b/linear_1/m16", "cublas-bf16"),
    ("quantized_linear", "qwen2-vl-7b/merger.mlp.2/m2304", "mmkernels(w8a16)"),
    ("varlen_attention", "whisper-large-v3/cross-448", "mmkernels"),
    ("varlen_attention", "blip2-qformer/b16", "mmkernels"),
    ("varlen_attention", "mllama-11b/4img-2k", "mmkernels"),
)


def _registry():
    from benchmarks import harness

    registry, errors = harness.discover()
    for module, why in errors.items():
        print(f"gpu_probe: {module} not importable: {why}", file=sys.stderr)
    return {name: reg.benchmark for name, reg in registry.items()}


def _case(bench, name):
    for case in bench.cases:
        if case.name == name:
            return case
    raise KeyError(f"{bench.name}: no case {name!r}")


def _provider(bench, name):
    for provider in bench.providers:
        if provider.name == name:
            return provider
    raise KeyError(f"{bench.name}: no provider {name!r}")


def _cuda_median_us(fn, reps: int = 50) -> float:
    start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        start[i].record()
        fn()
        end[i].record()
    torch.cuda.synchronize()
    return 1000.0 * statistics.median(s.elapsed_time(e) for s, e in zip(start, end))


def _host_us(fn, calls: int = 200) -> float:
    """Host microseconds per call: enqueue ``calls`` calls, no sync in between. The GPU
    queue absorbs them (up to ~1024 pending launches) so this is the Python + launch cost."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return 1e6 * (t1 - t0) / calls


def _graph_device_us(fn, replays: int = 50) -> float | str:
    """Device microseconds per call: one call captured in a CUDA graph, replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm: kernels compiled, allocator pools primed on this stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as exc:  # an op with a host sync cannot be captured: say so
        return f"not capturable: {type(exc).__name__}: {str(exc)[:200]}"
    graph.replay()
    torch.cuda.synchronize()
    return _cuda_median_us(graph.replay, reps=replays)


def _top_functions(fn, calls: int = 100, top: int = 5) -> list[str]:
    profile = cProfile.Profile()
    torch.cuda.synchronize()
    profile.enable()
    for _ in range(calls):
        fn()
    profile.disable()
    torch.cuda.synchronize()
    stream = io.StringIO()
    stats = pstats.Stats(profile, stream=stream)
    rows = []
    for (filename, line, func), (_, ncalls, tottime, cumtime, _) in sorted(
        stats.stats.items(), key=lambda kv: kv[1][2], reverse=True
    )[:top]:
        short = "/".join(Path(filename).parts[-2:])
        rows.append(f"{1e6 * tottime / calls:.1f} us/call own ({ncalls // calls} calls) {short}:{line} {func}")
    return rows


@triton.jit
def empty_kernel(x_ptr, n, BLOCK: tl.constexpr):
    """The least a launch can be: Triton's fixed cost per launch on this host."""
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.zeros([BLOCK], tl.float32), mask=offs < n)


class _LaunchCapture:
    """Stands in for one ``@triton.jit`` kernel: launches it and keeps the first launch's
    grid, arguments and meta-parameters for replay."""

    def __init__(self, name, kernel, captured: dict):
        self.name, self.kernel, self.captured = name, kernel, captured

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.captured.setdefault(self.name, (self.kernel, grid, args, meta))
            return self.kernel[grid](*args, **meta)

        return launch


@contextlib.contextmanager
def _launches_captured():
    from mmkernels.testing import kernels_replaced

    captured: dict = {}
    with kernels_replaced(lambda name, kernel: _LaunchCapture(name, kernel, captured)):
        yield captured


def probe_launch(registry, deadline: float) -> list[dict]:
    rows = []
    x = torch.zeros(16, device="cuda")
    empty = lambda: empty_kernel[(1,)](x, 16, BLOCK=16)  # noqa: E731
    empty()
    rows.append({"launch": "empty kernel (2 args, 1 constexpr)", "host_us": round(_host_us(empty, 500), 2)})
    a = torch.randn(16, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
    linear = lambda: torch.nn.functional.linear(a, w)  # noqa: E731
    linear()
    rows.append({"launch": "F.linear 16x1024x4096 bf16 (cuBLAS)", "host_us": round(_host_us(linear, 500), 2)})
    seen = set()
    for bench_name, case_name, provider_name in HOST_CASES:
        if time.time() > deadline or not provider_name.startswith("mmkernels") or (bench_name, provider_name) in seen:
            continue
        seen.add((bench_name, provider_name))
        try:
            bench = registry[bench_name]
            inputs = bench.make_inputs(_case(bench, case_name), torch.device("cuda"), 0)
            call = _provider(bench, provider_name).factory()
            call(inputs)  # compiled before the capture
            with _launches_captured() as captured:
                call(inputs)
            torch.cuda.synchronize()
            for name, (kernel, grid, args, meta) in captured.items():
                replay = lambda: kernel[grid](*args, **meta)  # noqa: E731
                rows.append({"launch": f"{name} ({bench_name} {provider_name}, {case_name}; {len(args)} args, "
                                       f"{len(meta)} meta)", "host_us": round(_host_us(replay, 300), 2)})  # fmt: skip
        except Exception as exc:
            rows.append({"launch": f"{bench_name} {provider_name}", "error": f"{type(exc).__name__}: {exc}"[:300]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def probe_host(registry, deadline: float) -> list[dict]:
    rows = []
    profiled_ops = set()
    for bench_name, case_name, provider_name in HOST_CASES:
        if time.time() > deadline:
            rows.append({"benchmark": bench_name, "case": case_name, "provider": provider_name,
                         "error": "not run: probe budget spent"})  # fmt: skip
            continue
        row = {"benchmark": bench_name, "case": case_name, "provider": provider_name}
        try:
            bench = registry[bench_name]
            inputs = bench.make_inputs(_case(bench, case_name), torch.device("cuda"), 0)
            call = _provider(bench, provider_name).factory()

            def fn(call=call, inputs=inputs):
                return call(inputs)

            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            row["eager_median_us"] = round(_cuda_median_us(fn), 2)
            row["host_us"] = round(_host_us(fn), 2)
            device = _graph_device_us(fn)
            row["device_us"] = round(device, 2) if isinstance(device, float) else device
            if isinstance(device, float):
                row["host_bound"] = row["host_us"] > device
            key = (bench_name, provider_name)
            if key not in profiled_ops:
                profiled_ops.add(key)
                row["top_functions"] = _top_functions(fn)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            row["traceback"] = traceback.format_exc()[-1500:]
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


# ======================================================================================
# Tile sweeps


def _patch_embed_configs(default_cfg, image_form: bool = True):
    """Candidate configs for one patch_embed case: the default's tiles with each other A
    source first (packed / the one-launch gather / row steps for images: the choice
    ``embed_config`` makes by row count), then tiles over packed A; then a few tiles of
    the one-launch loops."""
    from mmkernels.ops.patch_embed import A_SOURCES, EmbedConfig

    # Flat patches the benchmarks time are not normalized: read directly, whatever the source.
    sources = A_SOURCES if image_form else ()
    for source in sources:
        if source != default_cfg.a_source:
            # The K step of row steps is next_power_of_2(P), whatever block_k says.
            yield f"default tiles, {source}", default_cfg.with_a_source(source)
    for bm, bn, bk, warps, stages in (
        (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 32, 4, 4), (128, 128, 64, 4, 4),
        (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (256, 128, 32, 8, 3), (128, 128, 16, 8, 4),
    ):  # fmt: skip
        yield f"{bm}x{bn}x{bk} w{warps} s{stages}", EmbedConfig(bm, bn, bk, group_m=8, num_warps=warps, num_stages=stages)
    for source in (s for s in sources if s != "packed"):  # the one-launch loops
        for bm, bn, warps, stages in ((128, 128, 4, 4), (128, 256, 8, 3), (64, 128, 4, 4)):
            tiles = EmbedConfig(bm, bn, 64, group_m=8, num_warps=warps, num_stages=stages)
            yield f"{bm}x{bn} w{warps} s{stages}, {source}", tiles.with_a_source(source)


def _linear_configs(case, scheme: str, default_cfg):
    """Candidate tiles for one quantized_linear case: the default with the other tile
    layout (``swap_ab``, integer schemes) first; then large M varies the tile and warps,
    small M (split-K) the tile and the number of K splits, in the default's layout."""
    import dataclasses

    import triton

    from mmkernels.ops.quantized_linear import LinearConfig

    if scheme != "fp8":
        flipped = dataclasses.replace(default_cfg, swap_ab=not default_cfg.swap_ab)
        yield f"default, {'swapped' if flipped.swap_ab else 'unswapped'}", flipped
    if default_cfg.tma:
        # fp8 through TMA descriptors (sm_90 default) against its other tile width, and
        # against pointer loads at 128 x 128 (what sm_89 runs).
        wide = default_cfg.block_n == 256
        yield f"TMA 128x{128 if wide else 256}x128", dataclasses.replace(
            default_cfg, block_n=128 if wide else 256, num_stages=4 if wide else 3)
        yield "pointer loads 128x128x128 w8 s3", dataclasses.replace(default_cfg, block_n=128, num_stages=3, tma=False)

    k_cap = 128 if scheme == "w4a16" else 256  # a w4a16 K tile holds one group's scale
    if case.m > 64:
        tiles = ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4),
                 (128, 128, 128, 8, 3), (256, 128, 64, 8, 3))  # fmt: skip
        splits = (1,)
    else:
        # One launch with a deep pipeline instead of split-K: as many weight bytes in flight
        # per SM without the second kernel (split-K's reduction and its launch gap).
        for stages in (8, 6):
            bm, bn, bk = default_cfg.block_m, default_cfg.block_n, default_cfg.block_k
            yield f"{bm}x{bn}x{bk} w{default_cfg.num_warps} s{stages} split1 (deep, one launch)", LinearConfig(
                bm, bn, bk, 1, triton.cdiv(case.k, bk) * bk, group_m=8, num_warps=default_cfg.num_warps,
                num_stages=stages, swap_ab=default_cfg.swap_ab)
        tiles = ((16, 64, 128, 8, 4), (16, 64, 128, 4, 4), (16, 128, 128, 8, 4), (32, 64, 128, 8, 4),
                 (16, 64, 256, 8, 3))  # fmt: skip
        splits = sorted({1, max(default_cfg.split_k // 2, 1), default_cfg.split_k, min(default_cfg.split_k * 2, 32)})
    for bm, bn, bk, warps, stages in tiles:
        if bk > k_cap:
            continue
        k_steps = triton.cdiv(case.k, bk)
        for split in splits:
            k_per_split = triton.cdiv(k_steps, split) * bk
            real_split = triton.cdiv(case.k, k_per_split)
            yield f"{bm}x{bn}x{bk} w{warps} s{stages} split{real_split}", LinearConfig(
                bm, bn, bk, real_split, k_per_split, group_m=8, num_warps=warps, num_stages=stages,
                swap_ab=default_cfg.swap_ab)


@contextlib.contextmanager
def _config_override(module, attr, config):
    original = getattr(module, attr)
    setattr(module, attr, lambda *args, **kwargs: config)
    try:
        yield
    finally:
        setattr(module, attr, original)


def _bench_ms(fn) -> tuple[float, str]:
    """Median ms of ``fn()`` on the device alone: captured once in a CUDA graph (with the
    config override in force, so the launch it bakes in is the config's) and replayed,
    L2 flushed between replays (``benchmarks.harness.time_graph``); the small cases'
    eager time is the host's, which would hide the config. Falls back to
    ``triton.testing.do_bench`` (eager, host included) when the call cannot be captured.
    Returns (ms, how it was timed)."""
    from benchmarks import harness

    device = torch.device("cuda")
    try:
        config = harness.TimingConfig(warmup_ms=10.0, rep_ms=40.0, min_runs=5, max_runs=100, input_copies=1)
        timing, _ = harness.time_graph(lambda _: fn(), [None], None, clock=_flush_clock(device), device=device,
                                       config=config)  # fmt: skip
        return timing.median_ms, "graph"
    except Exception as exc:  # e.g. a host sync: time it eagerly and say so
        import triton.testing

        why = f"{type(exc).__name__}: {exc}"[:120]
        return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")), f"eager ({why})"


@functools.lru_cache(maxsize=None)
def _flush_clock(device: torch.device):
    """One CUDA clock (and its 256 MB L2-flush buffer) for the whole sweep."""
    from benchmarks import harness

    return harness.CudaClock(device)


def probe_sweep(registry, deadline: float) -> list[dict]:
    """Time each plan's configs against its default. Round robin over the plans (every
    plan's default, then every plan's first alternative, ...), so a short budget still
    measures the comparisons that decide defaults (the A source of patch_embed, the tile
    layout of quantized_linear) for every case; rows come back grouped by plan."""
    import importlib

    # The op modules by name: `mmkernels.ops.patch_embed` as an attribute is the function.
    pe_mod = importlib.import_module("mmkernels.ops.patch_embed")
    ql_mod = importlib.import_module("mmkernels.ops.quantized_linear")

    plans = []
    # CLIP x 64 packs first by default, SigLIP x 1 (729 rows) gathers in the GEMM: each is
    # timed against the other sources first (embed_config's row threshold).
    for case_name, provider_name in (("clip-l-14-336/b64", "mmkernels"), ("clip-l-14-336/b64", "mmkernels(uint8)"),
                                     ("siglip-so400m-14-384/b1", "mmkernels"), ("qwen2-vl-7b/4096p", "mmkernels")):  # fmt: skip
        plans.append(("patch_embed", case_name, provider_name, pe_mod, "embed_config", None))
    for case_name, scheme in (("qwen2-vl-7b/merger.mlp.2/m2304", "w8a16"), ("llava-1.5-7b/linear_1/m16", "w8a16"),
                              ("llava-1.5-7b/linear_1/m16", "w4a16"), ("qwen2-vl-7b/merger.mlp.2/m2304", "fp8")):
        plans.append(("quantized_linear", case_name, f"mmkernels({scheme})", ql_mod, "linear_config", scheme))

    prepared = []  # (plan, configs, inputs, call, expected); expected is the error text if the default failed
    for plan in plans:
        bench_name, case_name, provider_name, module, attr, scheme = plan
        bench = registry[bench_name]
        case = _case(bench, case_name)
        inputs = call = None
        try:
            inputs = bench.make_inputs(case, torch.device("cuda"), 0)
            call = _provider(bench, provider_name).factory()
            expected = call(inputs).float()
        except Exception as exc:
            expected = f"{type(exc).__name__}: {exc}"[:300]
        if bench_name == "patch_embed":
            default_cfg = module.embed_config(case.gemm_rows, case.dim, case.gemm_k, 2)
            configs = [(f"default {default_cfg}", None),
                       *_patch_embed_configs(default_cfg, image_form=len(case.weight_shape) == 4)]  # fmt: skip
        else:
            # The op's own choice for this weight: fp8 reads through TMA descriptors on sm_90+.
            qweight = getattr(inputs, "quantized", {}).get(scheme)
            tma = qweight is not None and module._tma_ready(qweight, torch.device("cuda"))
            default_cfg = module.linear_config(case.m, case.n, case.k, scheme, 128, 2, tma)
            configs = [(f"default {default_cfg}", None), *_linear_configs(case, scheme, default_cfg)]
        prepared.append((plan, configs, inputs, call, expected))

    rows = {}
    for index in range(max(len(p[1]) for p in prepared)):
        for plan_index, (plan, configs, inputs, call, expected) in enumerate(prepared):
            if index >= len(configs):
                continue
            bench_name, case_name, provider_name, module, attr, _ = plan
            label, cfg = configs[index]
            row = {"benchmark": bench_name, "case": case_name, "provider": provider_name, "config": label}
            rows[(plan_index, index)] = row
            if isinstance(expected, str):
                row["error"] = "not run: the default call failed: " + expected
                continue
            if time.time() > deadline:
                row["error"] = "not run: probe budget spent"
                continue
            try:
                ctx = contextlib.nullcontext() if cfg is None else _config_override(module, attr, cfg)
                with ctx:
                    out = call(inputs).float()
                    err = float((out - expected).abs().max() / expected.abs().max().clamp_min(1e-6))
                    row["max_rel_diff_vs_default"] = err
                    ms, row["timing"] = _bench_ms(lambda: call(inputs))
                    row["median_ms"] = round(ms, 5)
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            print(json.dumps(row), flush=True)
    return [rows[key] for key in sorted(rows)]


def render(data: dict) -> str:
    lines = ["# GPU probe", "", f"- {data.get('device')}; torch {data.get('torch')}, triton {data.get('triton')}", ""]
    if data.get("launch"):
        lines += ["## Host microseconds per launch", "", "| launch | host us |", "|---|---:|"]
        lines += [f"| {r['launch']} | {r.get('host_us', r.get('error', ''))} |" for r in data["launch"]] + [""]
    if data.get("host"):
        lines += ["## Host vs device per call", "",
                  "| benchmark | case | provider | eager median us | host us/call | device us/call (graph) | host-bound |",
                  "|---|---|---|---:|---:|---:|---|"]  # fmt: skip
        for r in data["host"]:
            lines.append(f"| {r['benchmark']} | {r['case']} | {r['provider']} | {r.get('eager_median_us', '')} | "
                         f"{r.get('host_us', '')} | {r.get('device_us', r.get('error', ''))} | {r.get('host_bound', '')} |")
        lines.append("")
        for r in data["host"]:
            if r.get("top_functions"):
                lines += [f"Top own time, {r['benchmark']} {r['provider']} ({r['case']}):", ""]
                lines += [f"- {t}" for t in r["top_functions"]] + [""]
    if data.get("sweep"):
        lines += ["## Tile sweeps (device time: CUDA graph replays, median)", "",
                  "| benchmark | case | provider | config | median ms | timed | max rel diff vs default |",
                  "|---|---|---|---|---:|---|---:|"]  # fmt: skip
        for r in data["sweep"]:
            lines.append(f"| {r['benchmark']} | {r['case']} | {r['provider']} | {r['config']} | "
                         f"{r.get('median_ms', r.get('error', ''))} | {r.get('timing', '')} | "
                         f"{r.get('max_rel_diff_vs_default', '')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=120.0, help="seconds for all parts (default 120)")
    parser.add_argument("--parts", default="launch,host,sweep")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_probe: needs a CUDA device", file=sys.stderr)
        return 2
    import triton

    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    data = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    registry = _registry()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]

    def save():
        (args.out / "probe.json").write_text(json.dumps(data, indent=1))
        (args.out / "probe.md").write_text(render(data))

    if "launch" in parts:
        data["launch"] = probe_launch(registry, started + args.budget * 0.15)
        save()
    if "host" in parts:
        data["host"] = probe_host(registry, started + args.budget * (0.45 if "sweep" in parts else 1.0))
        save()
    if "sweep" in parts:
        data["sweep"] = probe_sweep(registry, started + args.budget)
        save()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
