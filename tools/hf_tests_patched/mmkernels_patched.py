"""pytest plugin: run transformers' own model tests with every model they build patched.

Loaded with ``-p mmkernels_patched`` (``tools/run_hf_model_tests.sh`` puts this folder on
``PYTHONPATH``) while pytest runs inside a transformers source tree. It changes nothing in
that tree; it wraps two methods of ``transformers.PreTrainedModel`` for the session:

* ``post_init`` (the end of every model's ``__init__``: ``Model(config)``,
  ``_from_config``, every sub-model of a composite one) calls ``mmkernels.patch(model)``
  after the original; a model built on the meta device (``from_pretrained`` builds there)
  is patched when ``from_pretrained`` returns it loaded instead. Copies
  (``copy.deepcopy``, pickling) of a patched model stay patched through the engine, as
  for a user's model.
* ``get_correct_attn_implementation`` (where transformers resolves a requested attention
  implementation) answers ``"mmkernels"`` where it would have answered ``"sdpa"``,
  after ``mmkernels.integrations.register_attention()``.

Environment:
    MMKERNELS_HF_PATCH      1 (default): patch every model; 0: the plain baseline run
                            (attention switch still applies), to compare against.
    MMKERNELS_HF_ATTENTION  0 (default): leave attention alone; ``default``: models that
                            asked for no implementation (transformers' default, sdpa) get
                            "mmkernels"; ``sdpa``: explicit ``attn_implementation="sdpa"``
                            requests too (tests that then assert ``"sdpa"`` fail by design).
    MMKERNELS_HF_KERNELS    comma-separated kernels for ``patch(kernels=...)``; default all.

At the end the terminal summary says how many models were patched and how many
methods were replaced, so a run that silently patched nothing shows.
"""

from __future__ import annotations

import collections
import functools
import itertools
import os

_STATS: collections.Counter = collections.Counter()
_FAILURES: list[str] = []


def _enabled(name: str, default: str = "0") -> str:
    return os.environ.get(name, default).strip().lower()


def _install() -> dict[str, str]:
    import mmkernels
    from mmkernels import integrations
    from transformers import PreTrainedModel

    settings = {
        "patch": _enabled("MMKERNELS_HF_PATCH", "1"),
        "attention": _enabled("MMKERNELS_HF_ATTENTION", "0"),
        "kernels": os.environ.get("MMKERNELS_HF_KERNELS", "").strip(),
    }
    if settings["attention"] not in ("0", "", "default", "sdpa"):
        raise ValueError(f"MMKERNELS_HF_ATTENTION: expected 0, default or sdpa, got {settings['attention']!r}")
    kernels = [k for k in settings["kernels"].replace(";", ",").split(",") if k.strip()] or None

    if settings["patch"] not in ("0", ""):
        original_post_init = PreTrainedModel.post_init

        def patch(model):
            try:
                report = mmkernels.patch(model, kernels=kernels)
            except Exception as error:  # noqa: BLE001 - counted and shown, never hidden
                _FAILURES.append(f"{type(model).__name__}: {type(error).__name__}: {error}")
                raise
            if report.replaced:
                _STATS["models with a replacement"] += 1
                _STATS["methods replaced"] += len(report.replaced)

        @functools.wraps(original_post_init)
        def post_init(self, *args, **kwargs):
            result = original_post_init(self, *args, **kwargs)
            _STATS["post_init calls"] += 1
            if any(t.is_meta for t in itertools.chain(self.parameters(), self.buffers())):
                # Built on the meta device (from_pretrained builds there, then loads):
                # patched once loaded, below. patch() of a meta model is not what a user
                # runs after loading, and the patch-embed rule reads position ids.
                _STATS["post_init on meta (patched after from_pretrained)"] += 1
                return result
            patch(self)
            return result

        original_from_pretrained = PreTrainedModel.from_pretrained.__func__

        @functools.wraps(original_from_pretrained)
        def from_pretrained(cls, *args, **kwargs):
            model = original_from_pretrained(cls, *args, **kwargs)
            loaded = model[0] if isinstance(model, tuple) else model  # output_loading_info=True
            if isinstance(loaded, PreTrainedModel) and not any(
                t.is_meta for t in itertools.chain(loaded.parameters(), loaded.buffers())
            ):
                patch(loaded)
            return model

        PreTrainedModel.post_init = post_init
        PreTrainedModel.from_pretrained = classmethod(from_pretrained)

    if settings["attention"] in ("default", "sdpa"):
        integrations.register_attention()
        original_correct = PreTrainedModel.get_correct_attn_implementation
        also_explicit = settings["attention"] == "sdpa"

        @functools.wraps(original_correct)
        def get_correct_attn_implementation(self, requested_attention=None, is_init_check=False):
            chosen = original_correct(self, requested_attention, is_init_check)
            if chosen == "sdpa" and (requested_attention is None or also_explicit):
                _STATS["attention switched to mmkernels"] += 1
                return integrations.hf_attention.ATTN_IMPLEMENTATION
            return chosen

        PreTrainedModel.get_correct_attn_implementation = get_correct_attn_implementation
    return settings


_SETTINGS: dict[str, str] = {}


def pytest_configure(config):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before mmkernels' kernels are decorated
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _SETTINGS.update(_install())


def pytest_report_header(config):
    return (
        f"mmkernels_patched: patch={_SETTINGS.get('patch')} attention={_SETTINGS.get('attention') or '0'} "
        f"kernels={_SETTINGS.get('kernels') or 'all'}"
    )


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    terminalreporter.section("mmkernels_patched")
    terminalreporter.write_line(pytest_report_header(config))
    for key in ("post_init calls", "post_init on meta (patched after from_pretrained)", "models with a replacement",
                "methods replaced", "attention switched to mmkernels"):
        terminalreporter.write_line(f"{key}: {_STATS[key]}")
    for failure in _FAILURES[:20]:
        terminalreporter.write_line(f"patch raised: {failure}")
