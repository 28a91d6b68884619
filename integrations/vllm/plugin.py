"""The vLLM plugin: ``vllm serve <model>`` runs mmkernels' kernels with no change to the command.

Installed as the ``vllm.general_plugins`` entry point ``mmkernels`` ->
``mmkernels.integrations.vllm.plugin:register``. vLLM calls :func:`register` in every
process it starts (the CLI / API server, the engine core, each worker; CPU and CUDA
workers are spawned, so everything is registered inside the function, never at import).
Each process logs ONE line that says what was registered, or why nothing was (logger
``vllm.mmkernels``, through vLLM's own handler; straight to stderr, prefixed
``[mmkernels]``, in a process where vLLM has not configured logging yet: the CLI and
``LLM(...)`` load plugins before that)::

    mmkernels vLLM plugin (pid 1234, backend triton-interpreter): registered merge -> vLLM's
    shared _merge_multimodal_embeddings (every architecture that merges through it);
    patch_embed -> Conv2dLayer, Conv3dLayer (kernel == stride); encoder_attention ->
    MMEncoderAttention (varlen)

Replacements (read against vLLM 0.32), one adapter module each (its docstring says what it
covers and what falls through): the merge by replacing vLLM's one shared merge function,
the others through vLLM's own extension points:

* ``merge`` (:mod:`.merge`): vLLM's shared ``_merge_multimodal_embeddings``, replaced once
  in each process, so every architecture that merges through it is covered, not a list.
* ``patch_embed`` (:mod:`.patch_embed`): ``CustomOp.register_oot`` of subclasses of
  ``Conv2dLayer`` and ``Conv3dLayer``, for convolutions with kernel == stride.
* ``encoder_attention`` (:mod:`.encoder_attention`): ``CustomOp.register_oot`` of a
  subclass of ``MMEncoderAttention`` (the vision towers' attention), by varlen attention.
* ``quantized_projector`` (:mod:`.quant`): the quantization methods ``mmkernels-w8a16`` /
  ``mmkernels-w4a16`` / ``mmkernels-fp8``, which a model opts into with ``--quantization``;
  they quantize only the multimodal projector's linear layers, at load time, from an
  ordinary checkpoint.

Each adapter module has a function that registers its replacement with vLLM and returns
its part of the line (``register()``; :mod:`.quant`'s ``register_quantization()``), listed
in ``_REGISTRARS`` and imported only when its kernel is registered; the adapters report
their calls through :func:`record` and :func:`fallthrough`, and :func:`register_oot` is
the guarded ``CustomOp.register_oot`` they share.

Unsupported cases fall through to vLLM's own code path; the first such case per reason
and process is logged. The first call of each replacement per process logs which backend
mmkernels' op took (``triton``, ``triton-interpreter`` or ``reference`` with its reasons):
the debug hook that shows the kernel ran, not a fallback. :func:`stats` counts calls per
(replacement, backend) in the current process.

Environment:

* ``MMKERNELS_DISABLE=1``: register nothing (vLLM runs unchanged); the line says so.
* ``MMKERNELS_KERNELS=merge,patch_embed,encoder_attention,quantized_projector``: register only these
  (default: all of :data:`KERNELS`). Unknown names are reported in the line and ignored.

On a CPU platform the kernels need ``TRITON_INTERPRET=1`` in the environment before
vLLM starts (Triton reads it when kernels are decorated); without it, or on a platform
other than CUDA and CPU, nothing is registered and the line says why.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import sys
import threading
from typing import Callable

import torch

__all__ = ["KERNELS", "fallthrough", "record", "register", "register_oot", "stats"]

# A child of vLLM's logger: vLLM's handler prints it in every process, with vLLM's prefix.
log = logging.getLogger("vllm.mmkernels")

ENV_DISABLE = "MMKERNELS_DISABLE"
ENV_KERNELS = "MMKERNELS_KERNELS"
KERNELS = ("merge", "patch_embed", "encoder_attention", "quantized_projector")

_LOCK = threading.Lock()
_REGISTERED: dict[str, str] | None = None  # kernel -> summary, once per process
_NOTED: set = set()
_STATS: collections.Counter = collections.Counter()


def stats() -> dict[tuple[str, str], int]:
    """Calls of each replacement in this process, keyed by (replacement, backend);
    ``backend`` is ``fallthrough`` when vLLM's own path ran."""
    return dict(_STATS)


def _emit(level: int, msg: str, *args) -> None:
    """Log through vLLM's handler; before vLLM has configured logging in this process (the
    CLI and ``LLM(...)`` load plugins first), write the line to stderr ourselves."""
    if logging.getLogger("vllm").handlers or os.environ.get("VLLM_CONFIGURE_LOGGING", "1") == "0":
        log.log(level, msg, *args)
    else:
        sys.stderr.write(f"{logging.getLevelName(level)} [mmkernels] {msg % args}\n")
        sys.stderr.flush()


def _note_once(key, msg: str, *args) -> None:
    with _LOCK:
        if key in _NOTED:
            return
        _NOTED.add(key)
    _emit(logging.INFO, msg, *args)


def record(replacement: str, op: str, where: str) -> None:
    """The debug hook, for the adapters: which backend mmkernels' op just took (from
    mmkernels.backend), counted in :func:`stats` and logged on its first call."""
    if torch.compiler.is_compiling():
        return
    from mmkernels.backend import recent_decisions

    decisions = [d for d in recent_decisions()[-4:] if d.op == op]
    if not decisions:
        return
    decision = decisions[-1]
    _STATS[(replacement, decision.backend.value)] += 1
    reasons = f" ({'; '.join(decision.reasons)})" if decision.reasons else ""
    # The route a table chose (mmkernels.routes), for ops that have routes.
    route = f" route={decision.route} ({decision.route_source})" if decision.route is not None else ""
    _note_once(
        ("ran", replacement, decision.backend.value, decision.reasons, decision.route),
        "mmkernels %s ran: backend=%s%s%s [%s, pid %d, first call]",
        replacement, decision.backend.value, route, reasons, where, os.getpid(),
    )  # fmt: skip


def fallthrough(replacement: str, reason: str, where: str) -> None:
    """For the adapters: vLLM's own path runs this call of ``replacement`` (``where``: the
    layer or model), for ``reason``; counted in :func:`stats`, logged once per reason."""
    if torch.compiler.is_compiling():
        return
    _STATS[(replacement, "fallthrough")] += 1
    _note_once(
        ("fallthrough", replacement, reason, where),
        "mmkernels %s: %s not covered (%s): vLLM's own path runs [pid %d]",
        replacement, where, reason, os.getpid(),
    )  # fmt: skip


def register_oot(base, subclass) -> str:
    """``CustomOp.register_oot`` under the in-tree name, once (vLLM asserts on duplicates);
    shared by the adapters that replace a vLLM ``CustomOp`` layer."""
    from vllm.model_executor.custom_op import CustomOp, op_registry_oot

    name = base.__name__
    current = op_registry_oot.get(name)
    if current is not None:
        if getattr(current, "mmkernels_replaced", None):
            return f"{name} (already registered)"
        return f"{name} NOT replaced: {current.__module__}.{current.__qualname__} already registered for it"
    CustomOp.register_oot(subclass, name=name)
    return name


# --------------------------------------------------------------------------------------
# adapters: one module each, imported when its kernel is registered (they import the
# helpers above, so importing them here at the top would be a cycle)


def _register_merge() -> str:
    from mmkernels.integrations.vllm import merge

    return merge.register()


def _register_patch_embed() -> str:
    from mmkernels.integrations.vllm import patch_embed

    return patch_embed.register()


def _register_encoder_attention() -> str:
    from mmkernels.integrations.vllm import encoder_attention

    return encoder_attention.register()


def _register_quantized_projector() -> str:
    """The ``--quantization mmkernels-w8a16|w4a16|fp8`` methods (opt-in per model: nothing
    is quantized unless asked for); see :mod:`mmkernels.integrations.vllm.quant`."""
    from mmkernels.integrations.vllm.quant import register_quantization

    return register_quantization()


# kernel name -> function that registers it with vLLM and returns a summary for the log.
_REGISTRARS: dict[str, Callable[[], str]] = {
    "merge": _register_merge,
    "patch_embed": _register_patch_embed,
    "encoder_attention": _register_encoder_attention,
    "quantized_projector": _register_quantized_projector,
}


# --------------------------------------------------------------------------------------
# entry point


def _selected() -> tuple[list[str], list[str]]:
    """(kernels selected by MMKERNELS_KERNELS, entries that name no kernel). Names are
    case-insensitive and separated by commas, semicolons or spaces (``MERGE``,
    ``merge;patch_embed`` and ``merge patch_embed`` all select what they say)."""
    raw = os.environ.get(ENV_KERNELS, "").strip()
    if not raw or raw.lower() == "all":
        return list(KERNELS), []
    names = [n.lower() for n in re.split(r"[,;\s]+", raw) if n]
    return [n for n in KERNELS if n in names], [n for n in names if n not in KERNELS]


def _platform_backend() -> tuple[str | None, str]:
    """(backend the kernels will take, or None if they cannot run here; description)."""
    from mmkernels.backend import interpreter_enabled
    from vllm.platforms import current_platform

    if current_platform.is_cuda():
        return "triton", "triton"
    if current_platform.is_cpu():
        if interpreter_enabled():
            return "triton-interpreter", "triton-interpreter"
        return None, "CPU platform without TRITON_INTERPRET=1 (set it before vLLM starts)"
    return None, f"platform {current_platform.device_type!r} has no mmkernels backend"


def register() -> dict[str, str]:
    """The ``vllm.general_plugins`` entry point. Idempotent per process; never raises
    (a failure is logged as an error and vLLM runs unchanged). Returns what it registered
    (kernel -> summary)."""
    global _REGISTERED
    with _LOCK:
        if _REGISTERED is not None:
            return dict(_REGISTERED)
        _REGISTERED = {}
    pid = os.getpid()
    if os.environ.get(ENV_DISABLE, "").strip().lower() not in ("", "0", "false", "no", "off"):
        _emit(logging.INFO, "mmkernels vLLM plugin (pid %d): disabled by %s=%s; registered nothing", pid,
              ENV_DISABLE, os.environ[ENV_DISABLE])  # fmt: skip
        return {}
    try:
        backend, why = _platform_backend()
    except Exception as exc:  # noqa: BLE001 - a plugin must not take vLLM down
        _emit(logging.ERROR, "mmkernels vLLM plugin (pid %d): registered nothing: %s: %s", pid, type(exc).__name__, exc)
        return {}
    if backend is None:
        _emit(logging.INFO, "mmkernels vLLM plugin (pid %d): registered nothing: %s", pid, why)
        return {}
    selected, unknown = _selected()
    done, failed = {}, []
    for name in selected:
        try:
            done[name] = _REGISTRARS[name]()
        except Exception as exc:  # noqa: BLE001
            failed.append(f"{name} FAILED ({type(exc).__name__}: {exc})")
    _REGISTERED.update(done)
    parts = list(done.values()) + failed
    if unknown:
        parts.append(f"ignored unknown {ENV_KERNELS} entries {unknown} (known: {', '.join(KERNELS)})")
    skipped = [n for n in KERNELS if n not in selected]
    if skipped:
        parts.append(f"not selected by {ENV_KERNELS}: {', '.join(skipped)}")
    line = "mmkernels vLLM plugin (pid %d, backend %s): registered %s"
    # A setting that selects nothing or names an unknown kernel is a mistake: say so above INFO.
    level = logging.ERROR if failed else logging.WARNING if unknown or not selected else logging.INFO
    _emit(level, line, pid, backend, "; ".join(parts) if parts else "nothing")
    return dict(done)
