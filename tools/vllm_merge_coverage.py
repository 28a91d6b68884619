#!/usr/bin/env python3
"""Which of vLLM's multimodal architectures merge through its shared merge function (and
so run mmkernels' merge under the plugin), read from the installed vLLM.

    .venv-vllm/bin/python tools/vllm_merge_coverage.py [--markdown] [ARCH ...]

The plugin replaces ``vllm.model_executor.models.utils._merge_multimodal_embeddings``
(see ``mmkernels.integrations.vllm.merge``). An architecture is covered when the
``embed_input_ids`` its class resolves to is the interface default
(``SupportsMultiModal.embed_input_ids``, which calls the shared function), a pure
``super().embed_input_ids(...)`` delegation to it, or a method of its own whose code
calls the shared function by a name bound to it in its module. Anything else merges
its own way (or through helpers this reading does not follow) and keeps vLLM's code:
listed with the class that defines the method. Each model module is imported (on CPU,
no model is built); one that fails to import is listed with its error.
"""

from __future__ import annotations

import argparse
import importlib
import sys


def classify(arch: str, module_name: str, class_name: str) -> tuple[str, str]:
    """(verdict, detail): verdict is "shared" or "own" or "error"."""
    from vllm.model_executor.models import utils as vllm_utils
    from vllm.model_executor.models.interfaces import SupportsMultiModal

    shared = getattr(vllm_utils._merge_multimodal_embeddings, "mmkernels_replaces",
                     vllm_utils._merge_multimodal_embeddings)  # fmt: skip
    default = SupportsMultiModal.embed_input_ids
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except Exception as error:  # noqa: BLE001 - a module that needs what this machine lacks
        return "error", f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    for klass in cls.__mro__:
        own = klass.__dict__.get("embed_input_ids")
        if own is None:
            continue
        if own is default:
            return "shared", "SupportsMultiModal.embed_input_ids (the interface default)"
        code = getattr(own, "__code__", None)
        if code is None:
            return "own", f"{klass.__name__}.embed_input_ids (not a function)"
        names = set(code.co_names)
        if names <= {"super", "embed_input_ids"}:
            continue  # a pure delegation: what the next class defines decides
        module_globals = getattr(own, "__globals__", {})
        bound = [n for n in names if getattr(module_globals.get(n), "mmkernels_replaces", module_globals.get(n)) is shared]
        if bound:
            return "shared", f"{klass.__name__}.embed_input_ids calls {bound[0]}"
        return "own", f"{klass.__name__}.embed_input_ids"
    return "own", "no embed_input_ids"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archs", nargs="*", help="architecture names (default: every multimodal one)")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    import vllm
    from vllm.model_executor.models import registry

    table = registry._MULTIMODAL_MODELS
    unknown = [a for a in args.archs if a not in table]
    if unknown:
        print(f"not multimodal architectures of vLLM {vllm.__version__}: {', '.join(unknown)}", file=sys.stderr)
        return 2
    rows = []
    for arch in args.archs or sorted(table):
        module, class_name = table[arch]
        # As vLLM's registry resolves it: a short name in vllm.model_executor.models, or a full path.
        module = module if module.startswith("vllm.") else f"vllm.model_executor.models.{module}"
        verdict, detail = classify(arch, module, class_name)
        rows.append((arch, verdict, detail))
    counts = {v: sum(1 for _, verdict, _ in rows if verdict == v) for v in ("shared", "own", "error")}
    if args.markdown:
        print(f"vLLM {vllm.__version__}: {counts['shared']} of {len(rows)} multimodal architectures merge through "
              f"the shared function (mmkernels' merge), {counts['own']} their own way, {counts['error']} not "
              "importable here.\n")  # fmt: skip
        print("| architecture | merge | where |\n|---|---|---|")
        for arch, verdict, detail in rows:
            label = {"shared": "mmkernels", "own": "vLLM's own", "error": "not read"}[verdict]
            print(f"| {arch} | {label} | {detail.replace('|', '/')} |")
    else:
        for arch, verdict, detail in rows:
            print(f"{verdict:6s} {arch:50s} {detail}")
        print(f"vLLM {vllm.__version__}: shared {counts['shared']}, own {counts['own']}, error {counts['error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
