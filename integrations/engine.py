"""The generic patch engine: find the sub-models a rule covers, swap methods on the live
instances, record what was done, report it, and undo it exactly.

Nothing here knows a model family. A :class:`Rule` says which sub-models it covers (their
``config.model_type`` and class name), which method it replaces and with which op,
why it cannot apply to a given instance (:meth:`Rule.not_applicable_reasons`), and builds
the replacement function. Family knowledge lives in the specs (:mod:`.hf_specs`).

The ``model_type`` that governs a module is its own ``config.model_type``; a module without
a config (a small block such as Qwen2-VL's ``PatchEmbed``) is governed by its nearest
ancestor's. So a rule names such a block by its class within its tower's ``model_type``,
never by a (possibly generic) class name alone.

How a method is replaced, and why this way:

* On the instance, never the class: ``module.forward = MethodType(fn, module)``. The class,
  other instances, ``isinstance`` and ``state_dict`` (keys and values) are untouched.
* What the instance held before goes into one dict on the module,
  ``module._mmkernels_originals`` (method name -> :class:`Swap`: the previous instance
  attribute, or :data:`ABSENT` when the method came from the class, and the rule and
  options that made the replacement), so :func:`unpatch` restores the instance
  ``__dict__`` exactly: re-set what was there, delete what was not.
* A replacement finds the behaviour it wraps with :func:`original_method`, so it wraps
  whatever was there (the class method or another library's instance patch).

Copies and pickles stay patched, made again through the engine. A bound method does not
survive pickling: ``MethodType`` pickles as ``getattr(module, "forward")``, evaluated
while the module is rebuilt and before its ``__dict__`` is restored, so it came back as
the CLASS's method, stored on the instance next to a record that still said "patched"
(the model ran unpatched and ``patch()`` refused to patch it). So the first swap on a
module also installs an instance ``__reduce_ex__`` (recorded like a swap, removed by
unpatch) that pickles the module's own reduction without the swapped methods, plus a
declarative list of them (method name, rule, options: data, pickled by value). The
unpickler rebuilds the module through :func:`_rebuild_patched`, which asks each rule for
a fresh replacement bound to the new module before the module's state is restored around
it (an earlier instance patch bound to the module travels as its function and is bound
to the copy: :class:`_SelfBound`). ``pickle``, ``torch.save`` /
``torch.load(weights_only=False)``, ``copy.deepcopy`` and ``copy.copy`` all take this
path (they all call ``__reduce_ex__``), so a copy is patched exactly as the original,
with replacement state of its own (such as a patch-embed forward's position tables), and
``unpatch`` on it restores what it wrapped. Loading needs mmkernels importable; a model
loaded with ``attn_implementation="mmkernels"`` also needs that implementation registered
in the loading process (``mmkernels.integrations.register_attention()``, as ``patch``
does).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

__all__ = [
    "ABSENT",
    "Call",
    "ORIGINALS_ATTR",
    "PERMANENT_ATTR",
    "PatchOptions",
    "PatchReport",
    "Replacement",
    "Rule",
    "Skip",
    "SpecRule",
    "Swap",
    "backend_note",
    "bind_call",
    "check_undoable",
    "coverage_table",
    "forward_signature",
    "is_patched",
    "original_method",
    "patch_model",
    "permanent_changes",
    "record_permanent",
    "swap_method",
    "unpatch_model",
]

# The one attribute patch() adds to a module: method name -> Swap (what the instance held
# before, and what made the replacement).
ORIGINALS_ATTR = "_mmkernels_originals"
# The other attribute: what patching changed on a module that cannot be undone (a layer
# replaced by a quantized one, its full-precision weight gone): attribute name -> what was
# done. unpatch refuses while any module holds one (see record_permanent).
PERMANENT_ATTR = "_mmkernels_permanent"
# Installed with a module's first swap so that copies and pickles stay patched (see above).
_REDUCE = "__reduce_ex__"


class _Absent:
    """Marks a method that was not in the instance ``__dict__`` before patching (it came
    from the class): unpatch deletes the instance attribute instead of setting it."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    # One object, also across copies of a patched model.
    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (_Absent, ())

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT = _Absent()


@dataclasses.dataclass(frozen=True)
class PatchOptions:
    """What the caller asked for, handed to every replacement a rule builds."""

    check_placeholders: bool = True
    # (mean, std, scale) per channel: the patched embeddings take raw pixels (uint8, or
    # floats in 0..255) and normalize them in the kernel; None: pixels come normalized.
    pixel_normalization: tuple[tuple[float, ...], tuple[float, ...], float] | None = None


class Rule:
    """One replacement of one method on the sub-models a spec covers.

    Subclasses set the class attributes and implement :meth:`make_replacement`; the engine
    does the rest (walking, matching, recording, reporting, undoing).
    """

    kernel: str = ""  # the kernel name users pass in patch(kernels=...)
    family: str = ""  # a human name for the family ("LLaVA")
    model_type: str = ""  # the governing config.model_type (the module's own, else its nearest ancestor's)
    model_class: str = ""  # the sub-model's class name (matched anywhere in its MRO)
    method: str = ""  # the method replaced on the instance
    op: str = ""  # the op the replacement calls (for the report and the coverage table)

    def matches(self, module: torch.nn.Module, model_type: str | None = None) -> bool:
        """``model_type``: the one governing ``module`` (see :func:`patch_model`); None
        reads the module's own config."""
        if model_type is None:
            model_type = _model_type(module)
        return model_type == self.model_type and any(
            cls.__name__ == self.model_class for cls in type(module).__mro__
        )

    def located_at(self, below: tuple[str, ...]) -> bool:
        """Whether a matching module is at a place this rule covers. ``below``: its paths
        relative to each enclosing module whose own config has the governing model_type
        (``patch_embed.projection`` below a vision tower; a block inside the tower that
        holds the tower's config too adds its own). Every place, unless a rule names one (a
        tower's patch conv, not its neck's)."""
        return True

    def not_applicable_reasons(self, module: torch.nn.Module) -> list[str]:
        """Why this rule cannot patch this (matching) instance; empty when it can."""
        if not callable(getattr(module, self.method, None)):
            return [f"{type(module).__name__} has no method {self.method!r}"]
        return []

    def notes(self, module: torch.nn.Module, options: PatchOptions) -> list[str]:
        """Facts the report should state about a patched instance (which backend will
        run, what stays on the original path)."""
        return []

    def for_module(self, module: torch.nn.Module) -> "Rule":
        """The rule that patches this (matching, applicable) instance: itself, or for a
        rule that reads what to do from the instance's class (the generic merge rule), a
        rule of its own for that class (what the swap records, pickles and reports)."""
        return self

    def make_replacement(self, options: PatchOptions) -> Callable:
        """A function ``(self, *args, **kwargs)`` that replaces :attr:`method`; it reaches
        the behaviour it wraps through :func:`original_method`."""
        raise NotImplementedError

    def coverage_row(self) -> dict[str, str]:
        """Cells of the coverage table (see :func:`coverage_table`)."""
        return {
            "family": self.family,
            "model_type": self.model_type,
            "class": self.model_class,
            "method": self.method,
            "op": self.op.rsplit(".", 1)[-1],  # the table names the op, not its module path
        }


class SpecRule(Rule):
    """A rule built from a declarative spec that carries ``family``, ``model_type`` and
    ``model_class`` (the merge and patch-embed specs)."""

    def __init__(self, spec):
        self.spec = spec
        self.family = spec.family
        self.model_type = spec.model_type
        self.model_class = spec.model_class

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.family}: {self.spec.model_class}.{self.method})"


def backend_note(capabilities, tensor: torch.Tensor, routed: bool = False) -> str:
    """The report's line on which backend a patched call will take for ``tensor``'s device
    and dtype, from an op's declared capabilities; ``routed``: the op has routes, and the
    line says what chooses among them on a CUDA device (:func:`mmkernels.routes.describe`)."""
    reasons = capabilities.not_supported_reasons(tensor.device, [tensor.dtype])
    if reasons:
        return "runs the PyTorch reference: " + "; ".join(reasons)
    note = "Triton kernel" + (" (interpreter)" if tensor.device.type == "cpu" else "")
    if routed:
        from mmkernels import routes

        if tensor.device.type in routes.TABLE_DEVICE_TYPES:
            note += "; " + routes.describe(tensor.device)
    return note


@dataclasses.dataclass(frozen=True)
class Replacement:
    module_path: str
    class_name: str
    method: str
    op: str
    family: str
    notes: tuple[str, ...] = ()


# Why something was skipped, as a code (the reason text says it for people).
ALREADY_PATCHED = "already_patched"
NOT_REQUESTED = "not_requested"
NOT_APPLICABLE = "not_applicable"
NO_MATCH = "no_match"


@dataclasses.dataclass(frozen=True)
class Skip:
    module_path: str
    class_name: str
    reason: str
    code: str = NOT_APPLICABLE


def _display_path(path: str) -> str:
    return path if path else "<root>"


class PatchReport:
    """What :func:`patch_model` replaced and what it skipped, and why.

    ``replaced``: one :class:`Replacement` per swapped method; ``skipped``: one
    :class:`Skip` per sub-model (or kernel, or the whole model) left alone, with the
    reason. ``model_types``: the ``config.model_type`` of every sub-model seen.
    ``str(report)`` is a readable table.
    """

    def __init__(self, model_name: str, replaced: Sequence[Replacement], skipped: Sequence[Skip],
                 model_types: Sequence[str], supported_model_types: Sequence[str]):  # fmt: skip
        self.model_name = model_name
        self.replaced = list(replaced)
        self.skipped = list(skipped)
        self.model_types = list(model_types)
        self.supported_model_types = list(supported_model_types)

    @property
    def already_patched(self) -> list[Skip]:
        return [s for s in self.skipped if s.code == ALREADY_PATCHED]

    def __repr__(self) -> str:
        return f"PatchReport(model={self.model_name!r}, replaced={len(self.replaced)}, skipped={len(self.skipped)})"

    def __str__(self) -> str:
        lines = [f"mmkernels.patch({self.model_name}): replaced {len(self.replaced)}, skipped {len(self.skipped)}"]
        if self.replaced:
            rows = [(_display_path(r.module_path), r.class_name, r.method, r.op) for r in self.replaced]
            lines += ["", "replaced:"] + _text_table(("module", "class", "method", "op"), rows)
            noted = [r for r in self.replaced if r.notes]
            if noted:
                lines += ["", "notes:"]
                for r in noted:
                    lines.append(f"  {_display_path(r.module_path)} ({r.class_name}.{r.method}):")
                    lines += [f"    - {note}" for note in r.notes]
        if self.skipped:
            rows = [(_display_path(s.module_path), s.class_name, s.reason) for s in self.skipped]
            lines += ["", "skipped:"] + _text_table(("module", "class", "reason"), rows)
        return "\n".join(lines)


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]

    def fmt(row):
        return "  " + "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip()

    return [fmt(header), fmt(["-" * w for w in widths])] + [fmt(row) for row in rows]


# --------------------------------------------------------------------------------------
# Recording and undoing


@dataclasses.dataclass(frozen=True)
class Swap:
    """One instance attribute patch() set: what the instance held before (``previous``,
    :data:`ABSENT` when nothing), and the rule and options whose
    ``make_replacement(options)`` made it (None for the engine's own ``__reduce_ex__``).
    Data only, so a copy or an unpickled module can have its replacement made again."""

    previous: Any
    rule: Rule | None = None
    options: PatchOptions | None = None


@dataclasses.dataclass(frozen=True)
class _SelfBound:
    """A previous instance attribute that was a method bound to the module itself, as a
    pickled record holds it: the function alone, bound again when used. (Pickled as a
    bound method it would come back as ``getattr(module, name)`` on the half-rebuilt
    module, i.e. the new replacement, which would then wrap itself.)"""

    function: Callable

    def bind(self, module: torch.nn.Module) -> Callable:
        return _bind_method(self.function, module)


def _bind_method(function: Callable, module: torch.nn.Module) -> Callable:
    """``function`` bound to ``module``, in a form torch.compile calls as it is: a bound
    method in eager code, a ``functools.partial`` while Dynamo traces (it cannot call
    ``types.MethodType``: a graph break in every compiled call). Never
    ``function.__get__(module, cls)``: Dynamo gives that method the source
    ``module.<function name>``, which on a patched module is the INSTANCE attribute, the
    replacement itself; a graph break inside the original then resumed by calling the
    replacement, which called itself (the RecursionError of a compiled static-cache
    generate, issue 16)."""
    if torch.compiler.is_compiling():
        return functools.partial(function, module)
    return types.MethodType(function, module)


def _previous(module: torch.nn.Module, swap: Swap):
    return swap.previous.bind(module) if isinstance(swap.previous, _SelfBound) else swap.previous


def is_patched(module: torch.nn.Module) -> bool:
    return ORIGINALS_ATTR in module.__dict__


def original_method(module: torch.nn.Module, name: str) -> Callable:
    """The behaviour a replacement of ``name`` on ``module`` wraps: the instance attribute
    that was there before patching, else the class's method bound to ``module``."""
    swap = module.__dict__.get(ORIGINALS_ATTR, {}).get(name)
    if swap is None or swap.previous is ABSENT:
        function = getattr(type(module), name)
        if isinstance(function, types.FunctionType):
            return _bind_method(function, module)  # not function.__get__: see _bind_method
        return function.__get__(module, type(module))
    return _previous(module, swap)


def swap_method(module: torch.nn.Module, rule: Rule, options: PatchOptions) -> None:
    """Replace ``rule.method`` on ``module`` (the instance) with ``rule``'s replacement and
    record it: what :func:`patch_model` does per matching module, and what a caller that
    changes a module otherwise (the projector quantization) uses for the method swap that
    goes with it, so that copies and pickles rebuild it and :func:`unpatch_model` knows it."""
    _replace_method(module, rule.method, rule, options)


def record_permanent(module: torch.nn.Module, name: str, what: str) -> None:
    """Record on ``module`` that its attribute ``name`` was changed in a way :func:`unpatch_model`
    cannot undo (``what`` says how, for the refusal). Plain data in the instance
    ``__dict__``: it travels with copies and pickles, never reaches ``state_dict``."""
    permanent = module.__dict__.get(PERMANENT_ATTR)
    if permanent is None:
        permanent = {}
        object.__setattr__(module, PERMANENT_ATTR, permanent)
    permanent[name] = what


def permanent_changes(model: torch.nn.Module) -> list[str]:
    """``"<path>: <what>"`` for every change :func:`record_permanent` recorded in ``model``."""
    return [
        f"{'.'.join(p for p in (path, name) if p)}: {what}"
        for path, module in model.named_modules()
        for name, what in module.__dict__.get(PERMANENT_ATTR, {}).items()
    ]


def check_undoable(model: torch.nn.Module) -> None:
    """Raise ``RuntimeError`` naming every change in ``model`` that cannot be undone
    (:func:`record_permanent`); nothing when there is none."""
    permanent = permanent_changes(model)
    if permanent:
        raise RuntimeError(
            f"unpatch: {type(model).__name__} holds changes that cannot be undone ({'; '.join(permanent)}), so it "
            f"cannot be restored. Reload the original checkpoint instead (nothing was changed)."
        )


def _replace_method(module: torch.nn.Module, name: str, rule: Rule, options: PatchOptions) -> None:
    originals = module.__dict__.get(ORIGINALS_ATTR)
    if originals is None:
        originals = {_REDUCE: Swap(module.__dict__.get(_REDUCE, ABSENT))}
        # Plain instance attribute (a dict is neither a Parameter, a buffer nor a Module),
        # so it never reaches state_dict.
        object.__setattr__(module, ORIGINALS_ATTR, originals)
        object.__setattr__(module, _REDUCE, types.MethodType(_reduce_patched, module))
    originals[name] = Swap(module.__dict__.get(name, ABSENT), rule, options)
    object.__setattr__(module, name, _bound_replacement(module, name, rule, options))


def _bound_replacement(module: torch.nn.Module, name: str, rule: Rule, options: PatchOptions) -> types.MethodType:
    """``rule``'s replacement of ``name`` bound to ``module``, showing the signature of
    the method it wraps: code that inspects the method (Trainer's column pruning,
    transformers' own input checks, ``generate``'s keyword validation) sees the original
    parameters, not ``(*args, **kwargs)``. The function is a fresh copy per instance, so
    the signature set on it is this module's alone."""
    function = rule.make_replacement(options)
    copy = types.FunctionType(function.__code__, function.__globals__, function.__name__, function.__defaults__,
                              function.__closure__)  # fmt: skip
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__dict__.update(function.__dict__)
    copy.__qualname__, copy.__doc__, copy.__module__ = function.__qualname__, function.__doc__, function.__module__
    try:
        wrapped = inspect.signature(original_method(module, name))
    except (TypeError, ValueError):  # a builtin without a signature: leave the replacement's
        wrapped = None
    if wrapped is not None:
        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
        copy.__signature__ = wrapped.replace(parameters=[self_param, *wrapped.parameters.values()])
    return types.MethodType(copy, module)


def _restore(module: torch.nn.Module) -> None:
    originals = module.__dict__.pop(ORIGINALS_ATTR)
    for name, swap in originals.items():
        if swap.previous is ABSENT:
            module.__dict__.pop(name, None)
        else:
            module.__dict__[name] = _previous(module, swap)


def _reduce_patched(module: torch.nn.Module, protocol: int):
    """``__reduce_ex__`` of a patched module: its own reduction (the class's, or what the
    instance held before), with the swapped attributes left out of the state and rebuilt
    by :func:`_rebuild_patched` from their rules instead (see the module docstring)."""
    originals = module.__dict__[ORIGINALS_ATTR]
    own = originals[_REDUCE]
    reduce = type(module).__reduce_ex__.__get__(module) if own.previous is ABSENT else _previous(module, own)
    reduced = reduce(protocol)
    if not isinstance(reduced, tuple) or len(reduced) < 3 or not isinstance(reduced[2], dict):
        raise TypeError(
            f"{type(module).__name__}: a patched module pickles only with its __dict__ as state "
            f"(mmkernels.unpatch it first), got a reduction of {type(reduced).__name__}"
        )
    rebuild, args, state, *rest = reduced
    state = {key: value for key, value in state.items() if key == ORIGINALS_ATTR or key not in originals}
    state[ORIGINALS_ATTR] = {  # the copy's own record (copy.copy shares the state's values)
        name: dataclasses.replace(swap, previous=_SelfBound(swap.previous.__func__))
        if isinstance(swap.previous, types.MethodType) and swap.previous.__self__ is module else swap
        for name, swap in originals.items()
    }
    swaps = tuple((name, swap.rule, swap.options) for name, swap in originals.items() if swap.rule is not None)
    return (_rebuild_patched, (rebuild, args, swaps), state, *rest)


def _rebuild_patched(rebuild: Callable, args: tuple, swaps: tuple) -> torch.nn.Module:
    """The unpickled (or copied) module, with a fresh replacement per swap bound to it; the
    unpickler then restores the rest of its ``__dict__`` (``nn.Module.__setstate__``
    updates it, keeping these), the record of :data:`ORIGINALS_ATTR` included."""
    module = rebuild(*args)
    object.__setattr__(module, _REDUCE, types.MethodType(_reduce_patched, module))
    for name, rule, options in swaps:
        object.__setattr__(module, name, _bound_replacement(module, name, rule, options))
    return module


def unpatch_model(model: torch.nn.Module) -> int:
    """Undo every replacement on ``model`` and its sub-modules; returns how many modules
    were restored (0 on an unpatched model). Refuses with ``RuntimeError``, changing
    nothing, when the model holds a change that cannot be undone (:func:`record_permanent`)."""
    check_undoable(model)
    restored = 0
    for module in model.modules():
        if is_patched(module):
            _restore(module)
            restored += 1
    return restored


# --------------------------------------------------------------------------------------
# Patching


def _model_type(module: torch.nn.Module) -> str | None:
    config = getattr(module, "config", None)
    model_type = getattr(config, "model_type", None)
    return model_type if isinstance(model_type, str) and model_type else None


def _modules_with_model_type(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module, str, bool, tuple]]:
    """(path, module, governing model_type, whether it is the module's own, its paths below
    the enclosing modules whose own config has that model_type, outermost first) for every
    module governed by a model_type: its own config's, else its nearest ancestor's."""
    # path -> (model_type, paths of the consecutive enclosing modules carrying its config:
    # a tower, and a block inside it that holds the tower's config too)
    governing: dict[str, tuple[str | None, tuple[str, ...]]] = {}
    for path, module in model.named_modules():  # parents come before their children
        own = _model_type(module)
        parent_type, parent_roots = governing.get(path.rpartition(".")[0], (None, ())) if path else (None, ())
        if own is not None:
            model_type, roots = own, ((*parent_roots, path) if own == parent_type else (path,))
        else:
            model_type, roots = parent_type, parent_roots
        governing[path] = (model_type, roots)
        if model_type is not None:
            below = tuple("" if path == root else path[len(root) + 1 :] if root else path for root in roots)
            yield path, module, model_type, own is not None, below


def patch_model(model: torch.nn.Module, rules: Sequence[Rule], *, kernels: Iterable[str],
                options: PatchOptions) -> PatchReport:  # fmt: skip
    """Apply every rule whose kernel is in ``kernels`` to the matching sub-models of ``model``.

    A sub-model already patched is left as it is ("already patched"); a matching sub-model a
    rule cannot handle is skipped with the rule's reasons.
    """
    wanted = set(kernels)
    replaced: list[Replacement] = []
    skipped: list[Skip] = []
    seen_types: list[str] = []
    matched_any = False
    for path, module, model_type, own, below in _modules_with_model_type(model):
        if own and model_type not in seen_types:
            seen_types.append(model_type)
        for rule in rules:
            if not rule.matches(module, model_type) or not rule.located_at(below):
                continue
            matched_any = True
            cls_name = type(module).__name__
            if rule.kernel not in wanted:
                skipped.append(Skip(path, cls_name, f"kernel {rule.kernel!r} not requested", NOT_REQUESTED))
                continue
            if rule.method in module.__dict__.get(ORIGINALS_ATTR, {}):
                skipped.append(Skip(path, cls_name, "already patched (call mmkernels.unpatch first to re-patch)",
                                    ALREADY_PATCHED))
                continue
            reasons = rule.not_applicable_reasons(module)
            if reasons:
                skipped.append(Skip(path, cls_name, f"{rule.family} {rule.kernel}: " + "; ".join(reasons)))
                continue
            rule = rule.for_module(module)
            swap_method(module, rule, options)
            replaced.append(Replacement(path, cls_name, rule.method, rule.op, rule.family,
                                        tuple(rule.notes(module, options))))

    supported = sorted({rule.model_type for rule in rules if not getattr(rule, "generic", False)})
    if any(getattr(rule, "generic", False) for rule in rules):
        supported.append("any model with the shared merge pattern (generic rule)")
    if not matched_any:
        found = ", ".join(seen_types) if seen_types else "none (no sub-module has a config.model_type)"
        skipped.append(
            Skip("", type(model).__name__,
                 f"no sub-model matches a spec: model_types found: {found}; supported: {', '.join(supported)}",
                 NO_MATCH)
        )  # fmt: skip
    return PatchReport(type(model).__name__, replaced, skipped, seen_types, supported)


# --------------------------------------------------------------------------------------
# Coverage table


def coverage_table(rules: Sequence[Rule], columns: Sequence[tuple[str, str]],
                   extra: Callable[[Rule], dict[str, str]] | None = None) -> str:  # fmt: skip
    """A Markdown table with one row per rule, in the rules' order (deterministic, so a
    generator can paste it into the README). ``columns``: (key in
    :meth:`Rule.coverage_row`, or in ``extra(rule)``, header)."""

    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(header for _, header in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for rule in rules:
        row = {**rule.coverage_row(), **(extra(rule) if extra is not None else {})}
        lines.append("| " + " | ".join(cell(row.get(key, "")) for key, _ in columns) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# Binding a call (the merge, patch-embed and attention replacements all bind the original
# forward's call the same way)


@dataclasses.dataclass
class Call:
    """One call of the original ``forward``, bound to its signature: ``named`` holds the
    named parameters, ``extra`` what went into its ``**kwargs``."""

    named: dict[str, Any]
    extra: dict[str, Any]

    def get(self, name: str, default: Any = None) -> Any:
        if name in self.named:
            return self.named[name]
        return self.extra.get(name, default)


@dataclasses.dataclass(frozen=True)
class _BindPlan:
    """A forward's signature and what binding a call needs from it, as plain tuples:
    ``inspect.Signature.bind`` cannot be traced by torch.compile (its parameters are a
    mapping proxy: a graph break in every compiled decode step)."""

    signature: inspect.Signature
    var_keyword: str | None  # the **kwargs parameter's name
    positional: tuple[str, ...]  # parameters a positional argument fills, in order
    keywords: frozenset  # parameters a keyword argument fills
    var_positional: bool


_SIGNATURES: dict[Any, _BindPlan] = {}


def _plan(function: Callable) -> _BindPlan:
    """``function``'s :class:`_BindPlan` (following ``__wrapped__`` through HF's
    decorators), cached per underlying function: a bound method's, or a partial's
    (``original_method`` binds the class's forward with ``functools.partial`` under
    torch.compile). Filled when a rule checks a module at patch time, so a compiled
    forward only reads it."""
    key = getattr(function, "__func__", None) or getattr(function, "func", function)
    cached = _SIGNATURES.get(key)
    if cached is None:
        signature = inspect.signature(function)
        params = list(signature.parameters.values())
        cached = _SIGNATURES[key] = _BindPlan(
            signature,
            next((p.name for p in params if p.kind is p.VAR_KEYWORD), None),
            tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)),
            frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)),
            any(p.kind is p.VAR_POSITIONAL for p in params),
        )
    return cached


def forward_signature(function: Callable) -> tuple[inspect.Signature, str | None]:
    """The signature of ``function`` and the name of its ``**kwargs`` parameter (cached)."""
    plan = _plan(function)
    return plan.signature, plan.var_keyword


def bind_call(function: Callable, args: tuple, kwargs: dict) -> Call | None:
    """``Signature.bind`` without defaults (only what the call passed), in plain Python so
    torch.compile traces it; None where the call does not bind (the original then raises
    its own error) or where the function takes ``*args``."""
    plan = _plan(function)
    if plan.var_positional or len(args) > len(plan.positional):
        return None
    named = dict(zip(plan.positional, args))
    extra = {}
    for name, value in kwargs.items():
        if name in named:
            return None  # given positionally and by keyword
        if name in plan.keywords:
            named[name] = value
        elif plan.var_keyword is not None:
            extra[name] = value
        else:
            return None
    return Call(named, extra)
