"""tools/gpu_probe.py without a GPU: its cases name real benchmark cases and providers,
its tile sweeps are valid configurations, and its Markdown renders what it measured."""

import dataclasses
import importlib
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import gpu_probe  # noqa: E402


@pytest.fixture(scope="module")
def registry():
    return gpu_probe._registry()


def test_host_cases_exist(registry):
    for bench, case, provider in gpu_probe.HOST_CASES:
        assert gpu_probe._case(registry[bench], case).name == case
        assert gpu_probe._provider(registry[bench], provider).name == provider


@pytest.mark.parametrize("case_name,scheme", [("qwen2-vl-7b/merger.mlp.2/m2304", "w8a16"),
                                              ("llava-1.5-7b/linear_1/m16", "w4a16"),
                                              ("mllama-11b/multi_modal_projector/m16", "w8a16")])  # fmt: skip
def test_linear_sweep_configs_cover_k_without_empty_splits(registry, case_name, scheme):
    ql = importlib.import_module("mmkernels.ops.quantized_linear")
    case = gpu_probe._case(registry["quantized_linear"], case_name)
    default = ql.linear_config(case.m, case.n, case.k, scheme, 128, 2)
    configs = list(gpu_probe._linear_configs(case, scheme, default))
    assert len(configs) >= 4
    # The default tiles in the other layout come first; the rest keep the default's layout.
    assert configs[0][1] == dataclasses.replace(default, swap_ab=not default.swap_ab)
    assert all(cfg.swap_ab == default.swap_ab for _, cfg in configs[1:])
    if case.m <= 64:  # then one launch with a deep pipeline, against the default's split-K
        assert [(cfg.split_k, cfg.num_stages) for _, cfg in configs[1:3]] == [(1, 8), (1, 6)]
        assert all(cfg.block_n == default.block_n and cfg.block_k == default.block_k for _, cfg in configs[1:3])
    for label, cfg in configs:
        assert cfg.k_per_split % cfg.block_k == 0, label
        assert cfg.split_k * cfg.k_per_split >= case.k > (cfg.split_k - 1) * cfg.k_per_split, label
        if scheme == "w4a16":
            assert cfg.block_k <= 128, label  # one group scale per K tile


def test_fp8_sweep_times_tma_against_its_other_width_and_pointer_loads(registry):
    ql = importlib.import_module("mmkernels.ops.quantized_linear")
    case = gpu_probe._case(registry["quantized_linear"], "qwen2-vl-7b/merger.mlp.2/m2304")
    default = ql.linear_config(case.m, case.n, case.k, "fp8", 128, 2, True)
    assert default.tma and default.block_n == 256
    configs = list(gpu_probe._linear_configs(case, "fp8", default))
    assert [(cfg.tma, cfg.block_n, cfg.num_stages) for _, cfg in configs[:2]] == [(True, 128, 4), (False, 128, 3)]
    assert not any(cfg.tma for _, cfg in configs[2:])  # the tile sweep runs the pointer kernel


def test_render_lists_measurements_and_errors():
    text = gpu_probe.render({
        "device": "H200", "torch": "2.11", "triton": "3.6",
        "launch": [{"launch": "empty kernel (2 args, 1 constexpr)", "host_us": 9.5},
                   {"launch": "quantized_linear_kernel", "error": "ValueError: x"}],
        "host": [{"benchmark": "merge", "case": "c", "provider": "mmkernels", "eager_median_us": 50.0,
                  "host_us": 40.0, "device_us": 8.0, "host_bound": True, "top_functions": ["5.0 us own _validate"]},
                 {"benchmark": "merge", "case": "d", "provider": "mmkernels", "error": "RuntimeError: boom"}],
        "sweep": [{"benchmark": "patch_embed", "case": "c", "provider": "mmkernels", "config": "default",
                   "median_ms": 1.0, "timing": "graph", "max_rel_diff_vs_default": 0.0}],
    })  # fmt: skip
    assert "| empty kernel (2 args, 1 constexpr) | 9.5 |" in text and "| quantized_linear_kernel | ValueError: x |" in text
    assert "| merge | c | mmkernels | 50.0 | 40.0 | 8.0 | True |" in text
    assert "RuntimeError: boom" in text and "5.0 us own _validate" in text
    assert "| patch_embed | c | mmkernels | default | 1.0 | graph | 0.0 |" in text


def test_launch_capture_records_and_replays_the_real_launch(monkeypatch):
    # On the CPU under the interpreter: the captured launch, replayed alone, writes the
    # same output again (what the probe times on a GPU). The stand-in is not an
    # interpreted function, which the CPU backend check looks for (CUDA's does not).
    import torch

    from mmkernels import backend, ops
    from mmkernels.quant import quantize

    monkeypatch.setattr(backend, "_is_interpreted", lambda kernel: True)

    x, qw = torch.randn(3, 64), quantize(torch.randn(32, 64), "w8a16")
    with gpu_probe._launches_captured() as captured:
        out = ops.quantized_linear(x, qw, activation="gelu")
    assert not isinstance(importlib.import_module("mmkernels.ops.quantized_linear").kernels.quantized_linear_kernel,
                          gpu_probe._LaunchCapture)  # fmt: skip
    kernel, grid, args, meta = captured["quantized_linear_kernel"]
    target = next(a for a in args if isinstance(a, torch.Tensor) and a.data_ptr() == out.data_ptr())
    expected = out.clone()
    target.fill_(float("nan"))
    kernel[grid](*args, **meta)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("rows", [729, 36864], ids=["siglip-b1-gathers", "clip-b64-packs"])
def test_patch_embed_sweep_covers_every_a_source(rows):
    import importlib

    from mmkernels.ops.patch_embed import A_SOURCES

    default = importlib.import_module("mmkernels.ops.patch_embed").embed_config(rows, 1152, 588, 2)
    assert default.a_source == ("gather" if rows < 4096 else "packed")
    image = list(gpu_probe._patch_embed_configs(default, image_form=True))
    flat = list(gpu_probe._patch_embed_configs(default, image_form=False))
    assert {cfg.a_source for _, cfg in image} == set(A_SOURCES)
    # First the default's tiles with each other A source: the row threshold's question.
    others = [s for s in A_SOURCES if s != default.a_source]
    assert [cfg for _, cfg in image[:2]] == [default.with_a_source(s) for s in others]
    assert {cfg.a_source for _, cfg in flat} == {"packed"}  # flat, not normalized: read directly by all
    assert len({label for label, _ in image}) == len(image)

def test_sweep_measures_round_robin_and_returns_rows_by_plan(monkeypatch):
    """With budget for two rounds only, every plan gets its default and its first
    alternative (the A source / tile layout comparison) timed, nothing else; the rows
    come back grouped by plan, default first. Fake benchmarks: no GPU needed."""
    from types import SimpleNamespace as NS

    import torch

    def provider(name):
        return NS(name=name, factory=lambda: (lambda inputs: torch.ones(4)))

    from mmkernels.quant import quantize

    def bench(name, cases, providers, make_inputs=lambda case, device, seed: None):
        return NS(name=name, cases=cases, providers=[provider(p) for p in providers], make_inputs=make_inputs)

    def projector_inputs(case, device, seed):  # the fp8 weight the op's TMA choice reads
        return NS(quantized={"fp8": quantize(torch.randn(16, case.k), "fp8")})

    registry = {
        "patch_embed": bench("patch_embed", [
            NS(name="clip-l-14-336/b64", weight_shape=(1024, 3, 14, 14), gemm_rows=36864, dim=1024, gemm_k=588),
            NS(name="siglip-so400m-14-384/b1", weight_shape=(1152, 3, 14, 14), gemm_rows=729, dim=1152, gemm_k=588),
            NS(name="qwen2-vl-7b/4096p", weight_shape=(1280, 3, 2, 14, 14), gemm_rows=4096, dim=1280, gemm_k=1176)],
            ["mmkernels", "mmkernels(uint8)"]),
        "quantized_linear": bench("quantized_linear", [NS(name="qwen2-vl-7b/merger.mlp.2/m2304", m=2304, n=3584, k=5120),
                                                       NS(name="llava-1.5-7b/linear_1/m16", m=16, n=4096, k=1024)],
                                  ["mmkernels(w8a16)", "mmkernels(w4a16)", "mmkernels(fp8)"], projector_inputs),
    }  # fmt: skip
    clock = iter(range(10_000))
    monkeypatch.setattr(gpu_probe, "time", NS(time=lambda: next(clock)))
    monkeypatch.setattr(gpu_probe, "_bench_ms", lambda fn: (1.0, "graph"))
    ql = importlib.import_module("mmkernels.ops.quantized_linear")
    monkeypatch.setattr(ql, "compute_capability", lambda device: (9, 0))  # an H100 / H200
    n_plans = 8
    rows = gpu_probe.probe_sweep(registry, deadline=2 * n_plans - 0.5)
    plans = []
    for row in rows:
        key = (row["case"], row["provider"])
        if key not in plans:
            plans.append(key)
    assert len(plans) == n_plans
    for key in plans:
        mine = [r for r in rows if (r["case"], r["provider"]) == key]
        assert mine[0]["config"].startswith("default") and "median_ms" in mine[0], mine[0]
        assert mine[0]["timing"] == "graph"
        assert "median_ms" in mine[1], mine[1]
        assert all(r["error"] == "not run: probe budget spent" for r in mine[2:]), key
        assert len(mine) >= 3
        if key[1] == "mmkernels(fp8)":  # sm_90: the default reads through TMA, timed against 128-wide TMA tiles
            assert mine[0]["config"].startswith("default") and "tma=True" in mine[0]["config"], mine[0]
            assert mine[1]["config"] == "TMA 128x128x128", mine[1]
    # Grouped: each plan's rows are contiguous (a plan starts once).
    keys = [(r["case"], r["provider"]) for r in rows]
    starts = [key for i, key in enumerate(keys) if i == 0 or key != keys[i - 1]]
    assert starts == plans
