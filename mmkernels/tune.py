"""``mmkernels tune`` / ``python -m mmkernels.tune``: time every route of mmkernels' ops at
the shapes a model runs, on this GPU, and write the fastest to the route table.

    python -m mmkernels.tune MODEL [--images 1,4,16] [--schemes w8a16,w4a16] [--group-size 128]
                             [--dtype bfloat16] [--budget SECONDS] [--table PATH] [--retune]
    python -m mmkernels.tune --benchmark-shapes [--quick] ...   (from a source checkout)

MODEL is a Hugging Face model name or a local folder; only its config is read (no weights
are loaded: the model is built on the meta device to find its layers, and every tensor
timed is random, of the model's shapes). The cases:

* ``patch_embed``: each vision embedding that ``mmkernels.patch`` would patch, at the
  tower's image size, for each image count in ``--images``;
* ``quantized_linear``: each projector Linear that ``quantize_projector`` would quantize,
  for each scheme in ``--schemes``, at the vision tokens of each image count;
* ``varlen_attention``: the vision attention layers that ``mmkernels.patch`` gives
  ``cu_seqlens`` (Qwen2-VL's and the towers that kept it), each image count's images
  packed as sequences of the tower's patch count;
* with ``--benchmark-shapes`` instead of MODEL: the benchmark shape set of all four ops
  (the merge and the text side's attention too: their shapes come from how prompts and
  images are batched, which a model's config does not say; ``MMKERNELS_AUTOTUNE=1``
  tunes them at the shapes a server meets).

For each case every route that applies (:mod:`mmkernels.routes`: the op's Triton forms, its
heuristic, the standard PyTorch path) is run once and compared with the op's reference;
a route whose relative error exceeds the op's tolerance is rejected. The others are
timed from CUDA-graph replays with the L2 cache flushed before each (eagerly where a
route cannot be captured; the table says which), and the median is kept. The fastest
becomes the table's entry for (GPU, compute capability, torch, triton, op, shape bucket),
written after every case (so an interrupted run resumes where it stopped: a case whose
bucket the table already holds for this GPU and these versions is skipped unless
``--retune``). ``--budget`` stops timing new cases after that many seconds. The summary
says, per case, what won and by how much over the standard route and the heuristic.

The table is the user's (``$MMKERNELS_CACHE_DIR/routes.json``, default
``~/.cache/mmkernels/routes.json``) unless ``--table`` names another: the GPU suite writes
the shipped one (``mmkernels/tables/routes.json``). Exit codes: 0 done; 2 refused (no
CUDA GPU, bad arguments, no case found).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from mmkernels import routes
from mmkernels.routes import HEURISTIC, DeviceIdentity, TableEntry

__all__ = ["CudaTimer", "TuneCase", "TuneResult", "benchmark_cases", "default_timer", "main", "measure", "model_cases",
           "summary", "tune", "variant_and_bucket"]

EXIT_REFUSED = 2


@dataclasses.dataclass(frozen=True)
class TuneCase:
    """One call to tune: ``op`` (an :class:`mmkernels.backend.Op`) on the inputs
    ``make_inputs()`` makes (the registered op's inputs, on the device)."""

    name: str
    op: Any
    make_inputs: Callable[[], tuple]


@dataclasses.dataclass
class TuneResult:
    case: str
    op: str
    bucket: str
    winner: str | None
    medians_ms: dict
    rejected: dict  # route -> why
    timing: str
    skipped: str | None = None  # why the case was not timed


# --------------------------------------------------------------------------------------
# Timing


class CudaTimer:
    """Median milliseconds of ``fn`` on the current CUDA device, from CUDA-graph replays
    (eagerly when ``fn`` cannot be captured), the L2 cache flushed before each run."""

    def __init__(self, runs: int = 30, warmup: int = 3, flush_bytes: int = 256 << 20):
        self.runs, self.warmup = runs, warmup
        self.flush = torch.empty(flush_bytes, dtype=torch.uint8, device="cuda")

    def __call__(self, fn: Callable[[], Any], capturable: bool) -> tuple[float, str]:
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        run, timing = fn, "eager"
        if capturable:
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    fn()
                run, timing = graph.replay, "cuda-graph"
            except Exception:  # a route that syncs or allocates outside the pool: time it eagerly
                torch.cuda.synchronize()
        times = []
        for _ in range(self.runs):
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times), timing


_TIMERS: dict = {}


def default_timer(device: torch.device) -> Callable:
    """The timer for ``device``: one :class:`CudaTimer` per process (its L2 flush buffer is
    256 MB)."""
    if device.type != "cuda":
        raise ValueError(f"device: tuning times routes on a CUDA device, got {device}")
    if "cuda" not in _TIMERS:
        _TIMERS["cuda"] = CudaTimer()
    return _TIMERS["cuda"]


# --------------------------------------------------------------------------------------
# Tuning


def _candidates(op) -> dict[str, Callable]:
    """Route name -> run(args): the op's routes and its heuristic launcher."""
    return {HEURISTIC: op.launch, **{name: route.run for name, route in op.routes.items()}}


def measure(op, args, *, timer: Callable, reduction_length: int = 1) -> tuple[str | None, dict, dict, str]:
    """Every candidate of ``op`` on validated ``args``: checked against the op's reference
    (a route beyond the op's tolerance is rejected, with why), the others timed.
    Returns (winner or None, {route: median ms}, {route: why rejected}, timing)."""
    from mmkernels.testing import relative_error, tolerance

    reference = op.reference(args)
    allowed = tolerance(reference.dtype, reduction_length)
    medians, rejected, timings = {}, {}, set()
    for name, run in _candidates(op).items():
        route = op.routes.get(name)
        why = route.reason_not(args) if route is not None else None
        if why is not None:
            rejected[name] = why
            continue
        error = relative_error(run(args), reference)
        if not error <= allowed:
            rejected[name] = f"relative error {error:.3g} > tolerance {allowed:.3g}"
            continue
        medians[name], timing = timer(lambda run=run: run(args), route is None or route.capturable)
        timings.add(timing)
    winner = min(medians, key=medians.get) if medians else None
    return winner, medians, rejected, "eager" if "eager" in timings else "cuda-graph"


def variant_and_bucket(op, args) -> tuple[str, str]:
    """The table's op name (with the variant: ``quantized_linear[w8a16]``) and bucket of a call."""
    variant = op.needs(args).variant
    return (op.decision_name if variant is None else f"{op.decision_name}[{variant}]"), op.bucket(args)


def tune(cases: Sequence[TuneCase], *, identity: DeviceIdentity, timer: Callable, table: Path,
         budget_s: float | None = None, retune: bool = False, progress=sys.stderr) -> list[TuneResult]:  # fmt: skip
    """Time every route of each case (see the module docstring) and write the winners to
    ``table``. ``timer(fn, capturable) -> (median ms, "cuda-graph" | "eager")``;
    ``identity``: the GPU and versions the entries are keyed by."""
    have = set()
    if not retune:
        try:
            have = {entry.key for entry in routes.read_table(table)}
        except ValueError:
            pass  # unreadable: write_entries replaces it (with a warning)
    started = time.monotonic()
    results = []
    for number, case in enumerate(cases, 1):
        op = case.op
        args = op.validate(*case.make_inputs())
        variant_op, bucket = variant_and_bucket(op, args)
        key = (identity.gpu, identity.cc, identity.torch, identity.triton, variant_op, bucket)
        print(f"[{number}/{len(cases)}] {case.name} ({variant_op} {bucket})", file=progress, flush=True)
        if key in have:
            results.append(TuneResult(case.name, variant_op, bucket, None, {}, {}, "", "in the table already"))
            continue
        if budget_s is not None and time.monotonic() - started > budget_s:
            results.append(TuneResult(case.name, variant_op, bucket, None, {}, {}, "", "budget spent"))
            continue
        case_started = time.monotonic()
        winner, medians, rejected, timing = measure(op, args, timer=timer, reduction_length=op.reduction_length(args))
        results.append(TuneResult(case.name, variant_op, bucket, winner, medians, rejected, timing))
        print("    " + _progress_line(winner, medians, rejected, time.monotonic() - case_started,
                                      time.monotonic() - started, number, len(cases)), file=progress, flush=True)  # fmt: skip
        if winner is not None:
            routes.write_entries(table, [TableEntry(identity.gpu, identity.cc, identity.torch, identity.triton,
                                                    variant_op, bucket, winner, medians, timing)])  # fmt: skip
            have.add(key)
    return results


def _progress_line(winner, medians: dict, rejected: dict, case_s: float, elapsed_s: float, done: int,
                   total: int) -> str:  # fmt: skip
    """What a case found, and the time so far and left (cases left at the mean case time)."""
    found = (f"{winner} won at {medians[winner] * 1000:.1f} us of {len(medians)} timed" if winner is not None
             else "no route passed its check")  # fmt: skip
    if rejected:
        found += f", {len(rejected)} not taken"
    left = elapsed_s / done * (total - done)
    return f"{found}; {case_s:.1f} s, {elapsed_s:.0f} s so far, about {left:.0f} s left"


def summary(results: Sequence[TuneResult], standard: dict[str, str]) -> str:
    """One line per case: the winner and its speedup over the standard route and the heuristic."""
    lines = []
    for r in results:
        if r.skipped:
            lines.append(f"{r.case}: skipped ({r.skipped})")
            continue
        if r.winner is None:
            lines.append(f"{r.case}: no route passed its check: " + "; ".join(f"{k}: {v}" for k, v in r.rejected.items()))
            continue
        best = r.medians_ms[r.winner]
        parts = [f"{r.case}: {r.winner} {best * 1000:.1f} us"]
        for label, name in (("standard", standard.get(r.op.split("[")[0])), ("heuristic", HEURISTIC)):
            if name is not None and name in r.medians_ms and name != r.winner:
                parts.append(f"{r.medians_ms[name] / best:.2f}x faster than {label} ({name})")
        lines.append(", ".join(parts))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# The cases of a model


def _meta_model(config):
    import transformers

    last = None
    for name in ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModel"):
        auto = getattr(transformers, name, None)
        if auto is None:
            continue
        try:
            with torch.device("meta"):
                return auto.from_config(config)
        except (ValueError, KeyError) as error:  # not a model type this auto class maps
            last = error
    raise ValueError(f"MODEL: no transformers model class builds config {type(config).__name__}: {last}")


def _image_size(config, default: int) -> int:
    size = getattr(config, "image_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0]
    return size if isinstance(size, int) and size > 0 else default


def _patch_convs(model: torch.nn.Module):
    """(path, conv) of every patch projection: a Conv2d / Conv3d whose kernel equals its
    stride, without padding, groups or dilation (what patch_embed computes)."""
    for path, module in model.named_modules():
        if (isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)) and tuple(module.kernel_size) == tuple(module.stride)
                and not any(module.padding if isinstance(module.padding, tuple) else (1,)) and module.groups == 1
                and set(module.dilation) == {1}):  # fmt: skip
            yield path, module


def _nearest_config(model: torch.nn.Module, path: str):
    """The config of the nearest module at or above ``path`` that has one with an image size."""
    parts = path.split(".")
    for i in range(len(parts), -1, -1):
        config = getattr(model.get_submodule(".".join(parts[:i])), "config", None)
        if getattr(config, "image_size", None) is not None:
            return config
    return None


def model_cases(model_or_path, *, device: torch.device, dtype: torch.dtype, images: Sequence[int],
                schemes: Sequence[str], group_size: int = 128) -> list[TuneCase]:  # fmt: skip
    """The tuning cases of a Hugging Face model (a name, a folder, or a config)."""
    import transformers

    from mmkernels.integrations import hf_quant
    from mmkernels.quant import SCHEME_TABLE, quantize

    # By module path: mmkernels.ops' names patch_embed and quantized_linear are the op functions.
    patch_embed_module = importlib.import_module("mmkernels.ops.patch_embed")
    quantized_linear_module = importlib.import_module("mmkernels.ops.quantized_linear")

    config = model_or_path
    if not isinstance(config, transformers.PretrainedConfig):
        config = transformers.AutoConfig.from_pretrained(model_or_path)
    model = _meta_model(config)
    vision_config = getattr(config, "vision_config", None) or config
    image_size = _image_size(vision_config, 448)
    cases: list[TuneCase] = []
    gen = torch.Generator().manual_seed(0)

    def random(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    tokens_per_image = 256
    for path, conv in _patch_convs(model):
        weight_shape, bias = tuple(conv.weight.shape), conv.bias is not None
        p = conv.kernel_size[-1]
        size = _image_size(_nearest_config(model, path) or vision_config, image_size)
        tokens_per_image = (size // p) ** 2
        for n in images:
            if conv.weight.dim() == 5:  # pre-flattened patches (Qwen2-VL's Conv3d)
                pixel_shape = (n * tokens_per_image, math.prod(weight_shape[1:]))
            else:
                pixel_shape = (n, weight_shape[1], size, size)

            def make(pixel_shape=pixel_shape, weight_shape=weight_shape, bias=bias):
                return (random(*pixel_shape), random(*weight_shape), random(weight_shape[0]) if bias else None,
                        None, None, None, None, None, None)  # fmt: skip

            cases.append(TuneCase(f"patch_embed/{path}/x{n}", patch_embed_module.OP, make))
    for path, linear, activation in hf_quant.projector_linears(model):
        k, n_out = linear.in_features, linear.out_features
        for scheme in schemes:
            grouped = SCHEME_TABLE[scheme].grouped
            if grouped and k % group_size:
                continue
            for n in images:
                m = n * tokens_per_image

                def make(m=m, k=k, n_out=n_out, scheme=scheme, grouped=grouped, bias=linear.bias is not None,
                         activation=activation):  # fmt: skip
                    qw = quantize(torch.randn(n_out, k, generator=gen), scheme,
                                  **({"group_size": group_size} if grouped else {})).to(device)  # fmt: skip
                    return (random(m, k), qw.packed, qw.scales, qw.zeros, random(n_out) if bias else None, qw.scheme,
                            qw.group_size or 0, activation or "none")  # fmt: skip

                cases.append(TuneCase(f"quantized_linear/{path}/{scheme}/m{m}", quantized_linear_module.OP, make))
    cases += _vision_attention_cases(model, random, images, tokens_per_image)
    return cases


def _vision_attention_cases(model: torch.nn.Module, random: Callable, images: Sequence[int],
                            tokens_per_image: int) -> list[TuneCase]:  # fmt: skip
    """``varlen_attention`` at the vision attention layers ``mmkernels.patch`` gives
    ``cu_seqlens`` (Qwen2-VL's layer and the towers that kept it): one case per distinct
    (heads, head_dim), each image count's images of the tower's patch count packed as
    sequences (the tower's full-attention layers; Qwen2.5-VL's windowed ones are shorter)."""
    from mmkernels.integrations import hf_attention

    attention_module = importlib.import_module("mmkernels.ops.varlen_attention")
    classes = {spec.model_class for spec in hf_attention.ATTENTION_SPECS
               if spec.route in (hf_attention.CU_SEQLENS, hf_attention.CU_SEQLENS_QK_NORM)}  # fmt: skip
    seen, cases = set(), []
    for path, module in model.named_modules():
        qkv, heads = getattr(module, "qkv", None), getattr(module, "num_heads", None)
        if type(module).__name__ not in classes or not isinstance(qkv, torch.nn.Linear) or not isinstance(heads, int):
            continue
        head_dim = qkv.out_features // 3 // heads
        if (heads, head_dim) in seen:
            continue
        seen.add((heads, head_dim))
        for n in images:
            total = n * tokens_per_image

            def make(n=n, total=total, heads=heads, head_dim=head_dim):
                cu = torch.arange(0, total + 1, tokens_per_image, dtype=torch.int32)
                q, k, v = (random(total, heads, head_dim) for _ in range(3))
                cu = cu.to(q.device)
                return (q, k, v, cu, cu, tokens_per_image, tokens_per_image, head_dim**-0.5, False, None)

            cases.append(TuneCase(f"varlen_attention/{path}/x{n}", attention_module.OP, make))
    return cases


def benchmark_cases(*, device: torch.device, schemes: Sequence[str], quick: bool = False,
                    scaled: bool = False) -> list[TuneCase]:  # fmt: skip
    """The benchmark shape set's cells of all four ops, as the benchmarks build them
    (``quick``: the ``--quick`` subset; ``scaled``: CPU-sized, for checks in the
    interpreter). Needs the source checkout (``benchmarks/``)."""
    from mmkernels.bench import repo_root
    from mmkernels.quant import SCHEME_TABLE, quantize

    repo_root()  # puts the checkout on sys.path, or says plainly that there is none
    shapes = importlib.import_module("benchmarks.shapes")
    projector = importlib.import_module("benchmarks.bench_quantized_linear")
    patch_embed_module = importlib.import_module("mmkernels.ops.patch_embed")
    quantized_linear_module = importlib.import_module("mmkernels.ops.quantized_linear")
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16

    def random(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    cases = []
    for shape in shapes.QUICK_PATCH_EMBED_SHAPES if quick else shapes.PATCH_EMBED_SHAPES:
        shape = shape.scaled() if scaled else shape
        if shape.image_form:
            pixels, weight = (shape.batch, shape.channels, *shape.image_size), (shape.dim, shape.channels, shape.patch, shape.patch)
        else:
            pixels = (shape.flat_patches, shape.gemm_k)
            weight = (shape.dim, shape.channels, shape.temporal, shape.patch, shape.patch)

        def make(pixels=pixels, weight=weight, bias=shape.bias):
            return (random(*pixels), random(*weight), random(weight[0]) if bias else None,
                    None, None, None, None, None, None)  # fmt: skip

        cases.append(TuneCase(f"patch_embed/{shape.name}", patch_embed_module.OP, make))
    for shape in projector.QUICK_SHAPES if quick else projector.QUANTIZED_LINEAR_SHAPES:
        shape = shape.scaled() if scaled else shape
        for scheme in schemes:
            grouped = SCHEME_TABLE[scheme].grouped

            def make(shape=shape, scheme=scheme, grouped=grouped):
                qw = quantize(torch.randn(shape.n, shape.k, generator=gen), scheme,
                              **({"group_size": projector.GROUP_SIZE} if grouped else {})).to(device)  # fmt: skip
                return (random(shape.m, shape.k), qw.packed, qw.scales, qw.zeros, random(shape.n) if shape.bias else None,
                        qw.scheme, qw.group_size or 0, shape.activation or "none")  # fmt: skip

            cases.append(TuneCase(f"quantized_linear/{shape.name}/{scheme}", quantized_linear_module.OP, make))
    merge_bench = importlib.import_module("benchmarks.bench_merge")
    merge_module = importlib.import_module("mmkernels.ops.merge")
    for shape in shapes.QUICK_MERGE_SHAPES if quick else shapes.MERGE_SHAPES:
        shape = shape.scaled() if scaled else shape

        def make(shape=shape):  # check=True: what Hugging Face's merge does (every route applies)
            inputs = merge_bench.make_merge_inputs(shape, device, seed=0)
            return (inputs.input_ids, inputs.inputs_embeds, [f for items in inputs.items_per_kind for f in items],
                    [len(items) for items in inputs.items_per_kind], list(inputs.placeholder_ids), None, True, None)  # fmt: skip

        cases.append(TuneCase(f"merge/{shape.name}", merge_module.OP, make))
    attention_bench = importlib.import_module("benchmarks.bench_varlen_attention")
    attention_module = importlib.import_module("mmkernels.ops.varlen_attention")
    for shape in attention_bench.QUICK_ATTENTION_SHAPES if quick else attention_bench.ATTENTION_SHAPES:
        shape = shape.scaled() if scaled else shape

        def make(shape=shape):
            inputs = attention_bench.make_attention_inputs(shape, device, seed=0)
            return (inputs.q, inputs.k, inputs.v, inputs.cu_seqlens_q, inputs.cu_seqlens_k, max(shape.q_lens),
                    max(shape.k_lens), 1.0 / math.sqrt(shape.head_dim), shape.causal, inputs.kv_ranges)  # fmt: skip

        cases.append(TuneCase(f"varlen_attention/{shape.name}", attention_module.OP, make))
    return cases


# --------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmkernels tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="a Hugging Face model name or local folder (its config only)")
    parser.add_argument("--benchmark-shapes", action="store_true",
                        help="the benchmark shape set instead of a model (needs the source checkout)")
    parser.add_argument("--quick", action="store_true", help="with --benchmark-shapes: the --quick subset")
    parser.add_argument("--images", default="1,4,16", help="image counts per call (default 1,4,16)")
    parser.add_argument("--schemes", default="w8a16,w4a16,fp8", help="projector schemes (default all three)")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--budget", type=float, default=None, help="seconds after which no new case is timed")
    parser.add_argument("--table", type=Path, default=None, help="the table to write (default: the user's)")
    parser.add_argument("--retune", action="store_true", help="time buckets the table holds already")
    return parser


def main(argv: Sequence[str] | None = None, *, timer: Callable | None = None, device: torch.device | None = None,
         identity: DeviceIdentity | None = None) -> int:  # fmt: skip
    """The command. ``timer``, ``device`` and ``identity`` stand in for the CUDA ones (tests)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.model is None) == (not args.benchmark_shapes):
        print("mmkernels tune: pass MODEL or --benchmark-shapes (one of them)", file=sys.stderr)
        return EXIT_REFUSED
    try:
        images = [int(v) for v in args.images.split(",") if v]
        if not images or min(images) < 1:
            raise ValueError
    except ValueError:
        print(f"mmkernels tune: --images: expected positive integers separated by commas, got {args.images!r}",
              file=sys.stderr)  # fmt: skip
        return EXIT_REFUSED
    from mmkernels.quant import SCHEME_TABLE

    schemes = [s for s in args.schemes.split(",") if s]
    unknown = [s for s in schemes if s not in SCHEME_TABLE]
    if unknown:
        print(f"mmkernels tune: --schemes: expected names from {list(SCHEME_TABLE)}, got {unknown}", file=sys.stderr)
        return EXIT_REFUSED
    if device is None:
        if not torch.cuda.is_available():
            print("mmkernels tune: needs a CUDA GPU (it times routes on the GPU the table is for)", file=sys.stderr)
            return EXIT_REFUSED
        device = torch.device("cuda", torch.cuda.current_device())
    identity = identity or routes.device_identity(device)
    timer = timer or default_timer(device)
    try:
        if args.benchmark_shapes:
            cases = benchmark_cases(device=device, schemes=schemes, quick=args.quick)
        else:
            cases = model_cases(args.model, device=device, dtype=getattr(torch, args.dtype), images=images,
                                schemes=schemes, group_size=args.group_size)  # fmt: skip
    except (OSError, ValueError, RuntimeError) as error:
        print(f"mmkernels tune: {args.model or 'the benchmark shapes'}: {error}", file=sys.stderr)
        return EXIT_REFUSED
    if not cases:
        print(f"mmkernels tune: MODEL {args.model!r}: no patch embedding or projector Linear to tune", file=sys.stderr)
        return EXIT_REFUSED
    table = args.table or routes.user_table_path()
    print(f"mmkernels tune: {len(cases)} cases on {identity.gpu} (sm {identity.cc}, torch {identity.torch}, "
          f"triton {identity.triton}) -> {table}", file=sys.stderr)  # fmt: skip
    results = tune(cases, identity=identity, timer=timer, table=table, budget_s=args.budget, retune=args.retune)
    standard = {case.op.decision_name: next((n for n, r in case.op.routes.items() if r.standard), None) for case in cases}
    print(summary(results, standard))
    return 0


if __name__ == "__main__":
    sys.exit(main())
