"""The mmkernels demo (run it with `bash tools/demo.sh`).

For every tiny model family in :mod:`mmkernels.zoo` (real transformers classes, random
weights, nothing downloaded): run the unpatched forward, ``mmkernels.patch`` the model,
print the patch report, run the patched forward, and check the logits (bit-identical with
the merge alone, within 1e-5 in fp32 with every kernel) and that greedy generation gives
the same tokens; count host syncs.

On a machine with a CUDA GPU the kernels run compiled and the demo also times the merge
against Hugging Face's path (``--no-bench`` skips that). Without a GPU the kernels run in
Triton's interpreter on CPU and the demo says what it checked instead of timing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Triton reads this when kernels are decorated: before mmkernels is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mmkernels  # noqa: E402
from mmkernels import zoo  # noqa: E402
from mmkernels.testing import HostSyncCounter, relative_error  # noqa: E402


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _generate(model, inputs, n):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False)


def _patched(model, inputs, new_tokens, **options):
    """Logits, greedy tokens and host syncs with ``mmkernels.patch(model, **options)``."""
    report = mmkernels.patch(model, **options)
    try:
        with HostSyncCounter() as syncs:
            logits = _logits(model, inputs)
        return report, logits, _generate(model, inputs, new_tokens), syncs.count
    finally:
        mmkernels.unpatch(model)


def check_family(family: str, device: torch.device, new_tokens: int) -> dict:
    tiny = zoo.build(family)
    model = tiny.model.to(device)
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in tiny.inputs.items()}
    with HostSyncCounter() as before:
        ref = _logits(model, inputs)
    ref_tokens = _generate(model, inputs, new_tokens)
    # The merge alone is a copy: bit-identical. All kernels: the patch-embed GEMM sums in
    # another order than the convolution, so fp32 agreement within 1e-5 relative.
    _, merged, merged_tokens, merge_syncs = _patched(model, inputs, new_tokens, kernels=["merge"])
    _, _, _, unchecked_syncs = _patched(model, inputs, new_tokens, kernels=["merge"], check_placeholders=False)
    report, full, full_tokens, _ = _patched(model, inputs, new_tokens)
    print(report)
    restored = _logits(model, inputs)
    return {
        "family": family,
        "merge: logits bit-identical": torch.equal(merged, ref),
        "all kernels: logits rel. error": f"{relative_error(full, ref):.1e}",
        "all within 1e-5": relative_error(full, ref) <= 1e-5,
        "greedy tokens equal": torch.equal(merged_tokens, ref_tokens) and torch.equal(full_tokens, ref_tokens),
        "unpatch restores": torch.equal(restored, ref),
        "host syncs: HF / merge / merge, check_placeholders=False": (
            f"{before.count} / {merge_syncs} / {unchecked_syncs}"
        ),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(zoo.FAMILIES), help="comma-separated zoo families")
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--no-bench", action="store_true", help="on a GPU, skip timing the kernels")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    print(f"mmkernels {mmkernels.__version__} | torch {torch.__version__} | device: "
          f"{torch.cuda.get_device_name() if cuda else 'CPU (kernels run in the Triton interpreter)'}\n")
    print("Supported models (generated from the patch rules):\n")
    print(mmkernels.supported_models())

    rows, started = [], time.perf_counter()
    for family in [f for f in args.families.split(",") if f]:
        print(f"\n=== {family} ===")
        try:
            rows.append(check_family(family, device, args.new_tokens))
        except zoo.FamilyUnavailable as error:  # this transformers cannot build it: said, not failed
            print(f"skipped: {error}")

    print("\nResults")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    ok = all(row[k] is True for row in rows for k in keys if isinstance(row[k], bool))
    print(f"\n{'All checks passed' if ok else 'SOME CHECKS FAILED'} ({time.perf_counter() - started:.1f} s).")

    if cuda and not args.no_bench:
        from benchmarks import bench_merge

        out_dir = Path("benchmarks/results/demo")
        bench_merge.run(out_dir, quick=True)
        print(f"Merge timings written to {out_dir}/results.md:\n")
        print((out_dir / "results.md").read_text())
    elif not cuda:
        print(
            "No CUDA device: the Triton kernels ran in the interpreter and were checked "
            "against the unpatched models above; nothing was timed (interpreter timings mean nothing). "
            "On a GPU, `python tools/gpu_suite.py` runs the GPU tests and all benchmarks."
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
