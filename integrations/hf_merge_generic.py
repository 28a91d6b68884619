"""The generic merge rule: the merge patch for any Hugging Face VLM / audio-LLM inner model
whose ``forward`` follows the shared pattern, with no per-family code.

Most transformers multimodal inner models (``InternVLModel``, ``Qwen3_5Model``,
``AyaVisionModel``, ...) merge their media the same way::

    if inputs_embeds is None:
        inputs_embeds = self.get_input_embeddings()(input_ids)
    if pixel_values is not None:                      # (or: mm_encoder_outputs.get("image"))
        image_features = self.get_image_features(pixel_values, ..., return_dict=True).pooler_output
        image_features = torch.cat(image_features, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
        special_image_mask = self.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, ...)
        inputs_embeds = inputs_embeds.masked_scatter(special_image_mask, image_features)
    ... the language model on inputs_embeds ...

That is exactly what the merge pre-step (:mod:`.hf_merge`) replaces, given a
:class:`~.hf_merge.MergeSpec`. This module *derives* that spec from the model's own code:
it reads the class's ``forward`` (its source, parsed with :mod:`ast`; never executed or
copied) and takes, per medium, the call of ``get_image_features`` / ``get_video_features``
/ ``get_audio_features`` exactly as the forward writes it (which forward arguments go to
it, by position or by name, and whether the forward's ``**kwargs`` follow). A model is
matched by what it has (``get_placeholder_mask``, a feature method, ``input_ids`` and
``inputs_embeds`` arguments, a placeholder id in its config), never by its name.

A forward that does anything more with its media than the pattern cannot be merged by
the pre-step without changing what the model computes, so the derivation refuses it and
says where (the report's skip line): the placeholder mask used beyond ``masked_scatter``
(Qwen3-VL's deepstack ``visual_pos_masks``), another field of the encoder output read
(its ``deepstack_features``), the features transformed (scaled, projected) before the
scatter, the text embeddings computed another way (Gemma 3's ``llm_input_ids``) or even
when ``inputs_embeds`` is given, a media branch gated on more than its input (a
decode-step test), an argument of a feature call rebound first (VipLLaVA's
``vision_feature_layer`` default), or ``input_ids`` read after the merge by a forward
that accepts only one of ``input_ids`` / ``inputs_embeds``. What is passed on: the
merged ``inputs_embeds``, ``input_ids`` unless the forward refuses both, every argument
as given except each medium's input (``pixel_values``...) and ``mm_encoder_outputs``. The
per-family specs (:mod:`.hf_specs`) take precedence: the generic rule never matches a
``model_type`` that a spec names.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import os
import re
import textwrap
from typing import Callable

import torch

from .engine import Rule
from .hf_merge import MERGE_OP, MergeRule, MergeSpec, Modality

__all__ = ["Derivation", "GenericMergeRule", "derive_merge_spec"]

IMAGE_TOKEN = ("image_token_id", "image_token_index")
VIDEO_TOKEN = ("video_token_id", "video_token_index")
AUDIO_TOKEN = ("audio_token_id", "audio_token_index")

# kind -> (feature method, placeholder id fields, output fields: 5.24+ name first, then older)
KINDS: dict[str, tuple[str, tuple[str, ...], tuple[tuple[str, str], ...]]] = {
    "image": ("get_image_features", IMAGE_TOKEN,
              (("image_outputs", "encoder_output"), ("image_hidden_states", "features"))),
    "video": ("get_video_features", VIDEO_TOKEN,
              (("video_outputs", "encoder_output"), ("video_hidden_states", "flat_features"))),
    "audio": ("get_audio_features", AUDIO_TOKEN,
              (("audio_outputs", "encoder_output"), ("audio_hidden_states", "features"))),
}  # fmt: skip
_FEATURE_METHOD = re.compile(r"get_(\w+)_features$")
# Forward arguments that carry precomputed features in another form: the original handles them.
_PRECOMPUTED = re.compile(r"(image|video|audio)_(embeds|hidden_states|features)$")
# Methods on the features between the encoder output and the scatter that only move,
# cast or reshape them (the merge takes rows in the same order).
_FEATURE_RESHAPES = frozenset({"to", "reshape", "view", "flatten", "contiguous"})
ENCODER_OUTPUTS = "mm_encoder_outputs"


@dataclasses.dataclass(frozen=True)
class Derivation:
    """What the generic rule read from a class's ``forward``: a spec, or why there is none."""

    spec: MergeSpec | None
    reasons: tuple[str, ...] = ()
    merges_here: bool = True  # the forward calls a feature method: this class is where media are merged


class _Refused(Exception):
    pass


class _NotHere(_Refused):
    """The class merges nothing itself (a wrapper that delegates to its inner model)."""


def _line(node: ast.AST) -> str:
    return f"line {getattr(node, 'lineno', '?')}"  # of the modeling file (derive_merge_spec names it)


def _is_self_call(node: ast.AST, method: str | None = None) -> bool:
    """``self.<method>(...)`` (any method when ``method`` is None)."""
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "self"
        and (method is None or node.func.attr == method)
    )


def _is_method_call(node: ast.AST, receiver: str, method: str) -> bool:
    """``<receiver>.<method>(...)``."""
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == method
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == receiver
    )


def _names(node: ast.AST | None) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} if node is not None else set()


def _without_given_ids(test: ast.AST) -> ast.AST | None:
    """``test`` without its ``input_ids is not None`` operands (of an ``and``)."""
    def given_ids(node):
        return (isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and node.left.id == "input_ids"
                and len(node.ops) == 1 and isinstance(node.ops[0], ast.IsNot)
                and isinstance(node.comparators[0], ast.Constant) and node.comparators[0].value is None)  # fmt: skip

    if given_ids(test):
        return None
    if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And):
        return ast.BoolOp(op=test.op, values=[v for v in test.values if not given_ids(v)])
    return test


class _ForwardReader:
    """One pass over a forward's AST (see the module docstring for what it checks)."""

    def __init__(self, cls: type, function: ast.FunctionDef):
        self.cls = cls
        self.fn = function
        args = function.args
        if args.vararg is not None:
            raise _Refused("forward takes *args; the pre-step binds calls by name")
        self.params = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs][1:]  # without self
        self.var_keyword = args.kwarg.arg if args.kwarg is not None else None
        for name in ("input_ids", "inputs_embeds"):
            if name not in self.params:
                raise _Refused(f"forward has no {name!r} argument")
        self.parents: dict[ast.AST, ast.AST] = {}
        for parent in ast.walk(function):
            for child in ast.iter_child_nodes(parent):
                self.parents[child] = parent
        # Encoder outputs: a feature call, mm_encoder_outputs[...] / .get(...), or a name
        # assigned one of them. Features: names assigned a feature expression.
        self.encoder_names: set[str] = set()
        self.feature_names: set[str] = set()
        self.mask_names: set[str] = set()

    # ----------------------------------------------------------------- expressions

    def is_encoder(self, node: ast.AST) -> bool:
        if isinstance(node, ast.Name):
            return node.id in self.encoder_names
        if _is_self_call(node) and _FEATURE_METHOD.match(node.func.attr):
            return True
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
            return node.value.id == ENCODER_OUTPUTS
        return _is_method_call(node, ENCODER_OUTPUTS, "get")

    def is_features(self, node: ast.AST) -> bool:
        """The pooler output of an encoder output, possibly concatenated, cast, reshaped."""
        if isinstance(node, ast.Name):
            return node.id in self.feature_names
        if isinstance(node, ast.Attribute) and node.attr == "pooler_output":
            return self.is_encoder(node.value)
        if isinstance(node, ast.Call):
            func = node.func
            if (isinstance(func, ast.Attribute) and func.attr == "cat" and isinstance(func.value, ast.Name)
                    and func.value.id == "torch" and node.args):  # fmt: skip
                return self.is_features(node.args[0])
            if isinstance(func, ast.Attribute) and func.attr in _FEATURE_RESHAPES:
                return self.is_features(func.value)
        return False

    # ----------------------------------------------------------------- the read

    def read(self) -> MergeSpec:
        fn = self.fn
        feature_calls: dict[str, ast.Call] = {}
        for node in ast.walk(fn):
            if _is_self_call(node) and _FEATURE_METHOD.match(node.func.attr):
                kind = _FEATURE_METHOD.match(node.func.attr).group(1)
                if kind not in KINDS:
                    raise _Refused(f"calls {node.func.attr}, a medium the generic rule does not know ({_line(node)})")
                if kind in feature_calls:
                    raise _Refused(f"calls {node.func.attr} more than once")
                feature_calls[kind] = node
        if not feature_calls:
            raise _NotHere("forward calls none of get_image_features / get_video_features / get_audio_features")

        # Names bound to encoder outputs, features and placeholder masks (assignment order).
        for node in ast.walk(fn):
            if not isinstance(node, ast.Assign):
                continue
            value = node.value
            targets = node.targets
            if _is_self_call(value, "get_placeholder_mask"):
                for target in targets:
                    elements = target.elts if isinstance(target, ast.Tuple) else [target]
                    for element in elements:
                        if not isinstance(element, ast.Name):
                            raise _Refused(f"stores the placeholder mask in a non-name ({_line(node)})")
                        if element.id != "_":
                            self.mask_names.add(element.id)
                continue
            simple = [t.id for t in targets if isinstance(t, ast.Name)]
            if self.is_encoder(value):
                self.encoder_names.update(simple)
            elif self.is_features(value):
                self.feature_names.update(simple)
        # (is_features of a name assigned later in the source than it is read is handled
        # by a second pass: names only grow.)
        for node in ast.walk(fn):
            if isinstance(node, ast.Assign) and self.is_features(node.value):
                self.feature_names.update(t.id for t in node.targets if isinstance(t, ast.Name))

        drops_input_ids = self._check_input_ids()
        modalities = tuple(self._modality(kind, call) for kind, call in feature_calls.items())
        self._check_uses(triggers={m.trigger for m in modalities})
        # The pre-step calls the feature methods with the call's own arguments: a forward
        # that rebinds one first (a cast, a slice) would see other values than it passes.
        passed = {name for m in modalities for name in (*m.positional, *m.keywords)}
        for node in ast.walk(fn):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, (ast.AugAssign, ast.AnnAssign, ast.For, ast.NamedExpr)) else []  # fmt: skip
            for target in targets:
                for name in _names(target) & passed:
                    raise _Refused(f"rebinds {name}, which it passes to a feature method ({_line(node)})")
        precomputed = tuple(p for p in self.params if _PRECOMPUTED.match(p))
        return MergeSpec(
            family=f"{self.cls.__name__} (generic rule)",
            model_type="",
            model_class=self.cls.__name__,
            modalities=modalities,
            keeps_input_ids=not drops_input_ids,
            encoder_outputs_input=ENCODER_OUTPUTS if ENCODER_OUTPUTS in self.params else None,
            original_inputs=precomputed,
        )

    def _modality(self, kind: str, call: ast.Call) -> Modality:
        method_name, placeholder_fields, output_fields = KINDS[kind]
        method = getattr(self.cls, method_name, None)
        if not callable(method):
            raise _Refused(f"calls {method_name}, which {self.cls.__name__} does not have")
        positional, keywords, passes_kwargs = [], [], False
        for arg in call.args:
            if not (isinstance(arg, ast.Name) and arg.id in self.params):
                raise _Refused(f"passes {ast.unparse(arg)!r} to {method_name}, not a forward argument ({_line(call)})")
            positional.append(arg.id)
        for keyword in call.keywords:
            value = keyword.value
            if keyword.arg is None:
                if isinstance(value, ast.Name) and value.id == self.var_keyword:
                    passes_kwargs = True
                    continue
                raise _Refused(f"passes **{ast.unparse(value)} to {method_name} ({_line(call)})")
            if keyword.arg == "return_dict":
                continue  # the pre-step asks for the output object itself
            if not (isinstance(value, ast.Name) and value.id == keyword.arg and value.id in self.params):
                raise _Refused(f"passes {keyword.arg}={ast.unparse(value)} to {method_name}, not the forward "
                               f"argument of that name ({_line(call)})")  # fmt: skip
            keywords.append(keyword.arg)
        # The trigger: the forward argument that goes to the method's first parameter.
        parameters = [p for p in inspect.signature(method).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]  # fmt: skip
        first = parameters[0].name if parameters else None
        trigger = positional[0] if positional else first if first in keywords else None
        if trigger is None:
            raise _Refused(f"{method_name}: which forward argument carries the {kind} is not clear ({_line(call)})")
        self._check_branch(call, allowed={trigger, ENCODER_OUTPUTS, *self.encoder_names}, what=method_name)
        return Modality(
            kind=kind,
            placeholder_fields=placeholder_fields,
            trigger=trigger,
            consumed=(trigger,),
            feature_method=method_name,
            positional=tuple(positional),
            keywords=tuple(keywords),
            passes_forward_kwargs=passes_kwargs,
            output_fields=output_fields,
        )

    def _check_branch(self, node: ast.AST, allowed: set[str], what: str) -> None:
        """Every ``if`` around ``node`` tests only the names in ``allowed`` (and that
        ``input_ids`` is given, which it is whenever the pre-step merges)."""
        parent = self.parents.get(node)
        while parent is not None and parent is not self.fn:
            if isinstance(parent, (ast.If, ast.IfExp)):
                extra = _names(_without_given_ids(parent.test)) - allowed
                if extra:
                    raise _Refused(f"{what} runs under a condition on {', '.join(sorted(extra))} "
                                   f"({_line(parent)})")  # fmt: skip
            parent = self.parents.get(parent)

    def _check_input_ids(self) -> bool:
        """Whether the forward refuses ``input_ids`` next to ``inputs_embeds`` (then the
        pre-step drops them, so the forward must not read them after the merge)."""
        xor_tests = [
            node.test for node in ast.walk(self.fn)
            if isinstance(node, ast.If) and isinstance(node.test, ast.BinOp) and isinstance(node.test.op, ast.BitXor)
            and {"input_ids", "inputs_embeds"} <= _names(node.test)
        ]  # fmt: skip
        if not xor_tests:
            return False
        allowed: set[int] = set()
        for test in xor_tests:
            allowed.update(id(n) for n in ast.walk(test))
        for node in ast.walk(self.fn):
            # self.get_input_embeddings()(input_ids): the text lookup the merge replaces.
            if (isinstance(node, ast.Call) and _is_self_call(node.func, "get_input_embeddings")
                    and len(node.args) == 1 and isinstance(node.args[0], ast.Name)):  # fmt: skip
                allowed.add(id(node.args[0]))
            if _is_self_call(node, "get_placeholder_mask"):
                allowed.update(id(n) for n in ast.walk(node))
        for node in ast.walk(self.fn):
            if isinstance(node, ast.Name) and node.id == "input_ids" and isinstance(node.ctx, ast.Load):
                if id(node) not in allowed:
                    raise _Refused(f"reads input_ids beyond the text lookup and the placeholder mask, and takes "
                                   f"only one of input_ids / inputs_embeds ({_line(node)})")  # fmt: skip
        return True

    def _check_uses(self, triggers: set[str]) -> None:
        fn = self.fn
        scatter_calls = set()
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "masked_scatter":
                parent = self.parents.get(node)
                ok = (
                    _is_method_call(node, "inputs_embeds", "masked_scatter")
                    and len(node.args) == 2 and not node.keywords
                    and isinstance(node.args[0], ast.Name) and node.args[0].id in self.mask_names
                    and self.is_features(node.args[1])
                    and isinstance(parent, ast.Assign) and len(parent.targets) == 1
                    and isinstance(parent.targets[0], ast.Name) and parent.targets[0].id == "inputs_embeds"
                )  # fmt: skip
                if not ok:
                    raise _Refused(f"masked_scatter is not 'inputs_embeds = inputs_embeds.masked_scatter(mask, "
                                   f"features)' ({_line(node)})")  # fmt: skip
                scatter_calls.add(id(node))
            if _is_self_call(node, "get_placeholder_mask"):
                parent = self.parents.get(node)
                if not isinstance(parent, ast.Assign):
                    raise _Refused(f"uses get_placeholder_mask's result directly ({_line(node)})")
            # inputs_embeds is the text lookup, then the scatters (a cast allowed).
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "inputs_embeds"
                                                    for t in node.targets):  # fmt: skip
                value = node.value
                lookup = (isinstance(value, ast.Call) and _is_self_call(value.func, "get_input_embeddings")
                          and len(value.args) == 1 and isinstance(value.args[0], ast.Name)
                          and value.args[0].id == "input_ids")  # fmt: skip
                if not (lookup or _is_method_call(value, "inputs_embeds", "masked_scatter")
                        or _is_method_call(value, "inputs_embeds", "to")):  # fmt: skip
                    raise _Refused(f"computes inputs_embeds another way: {ast.unparse(value)[:60]!r} ({_line(node)})")
                if lookup and not self._under_no_embeds(node):
                    # It would overwrite the merged inputs_embeds the pre-step hands it.
                    raise _Refused(f"embeds input_ids even when inputs_embeds is given ({_line(node)})")
        # Every read of a mask is the scatter's mask; of an encoder output, its pooler
        # output (or handing it on whole to the output); of features, a step towards the scatter.
        for node in ast.walk(fn):
            if not (isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)):
                continue
            parent = self.parents.get(node)
            if node.id in self.mask_names:
                if not (isinstance(parent, ast.Call) and id(parent) in scatter_calls and parent.args[0] is node):
                    raise _Refused(f"uses the placeholder mask {node.id!r} beyond masked_scatter ({_line(node)})")
            elif node.id in self.encoder_names or node.id == ENCODER_OUTPUTS:
                self._check_encoder_use(node)
            elif node.id in self.feature_names:
                self._check_feature_use(node)
        for node in ast.walk(fn):
            if isinstance(node, (ast.Subscript, ast.Call)) and self.is_encoder(node) and not isinstance(node, ast.Name):
                if not (_is_self_call(node) and isinstance(self.parents.get(node), ast.Assign)):
                    self._check_encoder_use(node)
        for node in ast.walk(fn):
            if _is_self_call(node, "get_placeholder_mask"):
                self._check_branch(node, allowed={ENCODER_OUTPUTS, *self.encoder_names, *self.feature_names, *triggers},
                                   what="get_placeholder_mask")  # fmt: skip

    def _under_no_embeds(self, node: ast.AST) -> bool:
        """``node`` runs only when ``inputs_embeds is None`` (inside that ``if``'s body)."""
        child, parent = node, self.parents.get(node)
        while parent is not None and parent is not self.fn:
            if isinstance(parent, ast.If) and child in parent.body:
                test = parent.test
                if (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
                        and test.left.id == "inputs_embeds" and len(test.ops) == 1 and isinstance(test.ops[0], ast.Is)
                        and isinstance(test.comparators[0], ast.Constant) and test.comparators[0].value is None):  # fmt: skip
                    return True
            child, parent = parent, self.parents.get(parent)
        return False

    def _check_encoder_use(self, node: ast.AST) -> None:
        """An encoder output (or the mm_encoder_outputs dict) is read only for its pooler
        output, tested against None, stored, or handed on whole (to the output)."""
        parent = self.parents.get(node)
        if isinstance(node, ast.Name) and node.id == ENCODER_OUTPUTS:
            if isinstance(parent, (ast.Subscript, ast.Attribute)) and parent.value is node:
                if isinstance(parent, ast.Attribute) and parent.attr != "get":
                    raise _Refused(f"reads {ENCODER_OUTPUTS}.{parent.attr} ({_line(node)})")
                return  # its entries are checked as encoder outputs
            return  # tested, defaulted, handed on
        if isinstance(parent, ast.Attribute):
            if parent.attr != "pooler_output":
                raise _Refused(f"reads {parent.attr!r} of an encoder output, beyond its pooler_output "
                               f"({_line(node)})")  # fmt: skip
            return
        if isinstance(parent, ast.Call) and node in parent.args:
            raise _Refused(f"hands an encoder output to {ast.unparse(parent.func)} ({_line(node)})")

    def _check_feature_use(self, node: ast.Name) -> None:
        parent = self.parents.get(node)
        if isinstance(parent, ast.Attribute) and parent.value is node:
            if parent.attr in _FEATURE_RESHAPES or parent.attr in ("shape", "size", "dim", "device", "dtype", "numel"):
                return
            raise _Refused(f"uses {node.id}.{parent.attr} ({_line(node)})")
        if isinstance(parent, ast.Call):
            if _is_self_call(parent, "get_placeholder_mask") or self.is_features(parent):
                return
            if isinstance(parent.func, ast.Attribute) and parent.func.attr == "masked_scatter":
                return
            if node in parent.args:
                raise _Refused(f"hands the features {node.id!r} to {ast.unparse(parent.func)} ({_line(node)})")
            return  # a keyword of the output's constructor
        if isinstance(parent, ast.keyword):
            call = self.parents.get(parent)
            if isinstance(call, ast.Call) and (_is_self_call(call, "get_placeholder_mask") or self.is_features(call)):
                return
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Name):
                return  # the output class, built from them as the unpatched forward does
            raise _Refused(f"hands the features {node.id!r} to {ast.unparse(call.func)} ({_line(node)})")
        if isinstance(parent, (ast.Compare, ast.IfExp, ast.BoolOp, ast.UnaryOp)):
            return
        if isinstance(parent, ast.Assign):
            if self.is_features(parent.value):
                return
        raise _Refused(f"uses the features {node.id!r} in {type(parent).__name__} ({_line(node)})")


@functools.lru_cache(maxsize=None)
def derive_merge_spec(cls: type) -> Derivation:
    """The merge spec read from ``cls.forward`` (see the module docstring), or the reasons
    the generic rule cannot merge for ``cls``."""
    if not callable(getattr(cls, "get_placeholder_mask", None)):
        return Derivation(None, (f"{cls.__name__} has no get_placeholder_mask()",), merges_here=False)
    try:
        function = inspect.unwrap(cls.forward)
        lines, first_line = inspect.getsourcelines(function)
        tree = ast.parse(textwrap.dedent("".join(lines)))
        where = os.path.basename(inspect.getsourcefile(function) or "?")
    except (OSError, TypeError, SyntaxError) as error:
        return Derivation(None, (f"forward's source cannot be read ({type(error).__name__}: {error})",))
    ast.increment_lineno(tree, first_line - 1)  # line numbers of the modeling file
    definition = tree.body[0] if tree.body else None
    if not isinstance(definition, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return Derivation(None, ("forward's source is not a function definition",))
    try:
        return Derivation(_ForwardReader(cls, definition).read())
    except _Refused as refused:
        reason = re.sub(r"\(line (\d+)\)", rf"({where} line \1)", str(refused))
        return Derivation(None, (reason,), merges_here=not isinstance(refused, _NotHere))


class GenericMergeRule(Rule):
    """The merge patch for any inner model whose forward follows the shared pattern and
    whose ``model_type`` no spec names; patches through a :class:`~.hf_merge.MergeRule`
    built from :func:`derive_merge_spec`."""

    kernel = "merge"
    generic = True  # matches by structure: no model_type of its own (patch_model's "supported" list)
    family = "generic rule"
    model_type = "any without a spec"
    model_class = "any with get_placeholder_mask (see below)"
    method = "forward"
    op = f"mmkernels.ops.{MERGE_OP}"

    def __init__(self, spec_model_types: frozenset[str]):
        self.spec_model_types = spec_model_types

    def __repr__(self) -> str:
        return "GenericMergeRule()"

    def matches(self, module: torch.nn.Module, model_type: str | None = None) -> bool:
        # An inner model with its own config (not a block governed by an ancestor's) that
        # has the pattern's method; the forward is read in not_applicable_reasons.
        config = getattr(module, "config", None)
        own = getattr(config, "model_type", None)
        if not isinstance(own, str) or not own or own in self.spec_model_types:
            return False
        if model_type is not None and model_type != own:
            return False
        if not callable(getattr(type(module), "get_placeholder_mask", None)):
            return False
        return derive_merge_spec(type(module)).merges_here

    def for_module(self, module: torch.nn.Module) -> Rule:
        derivation = derive_merge_spec(type(module))
        if derivation.spec is None:
            return self
        return _derived_rule(type(module), _model_type(module))

    def not_applicable_reasons(self, module: torch.nn.Module) -> list[str]:
        derivation = derive_merge_spec(type(module))
        if derivation.spec is None:
            return list(derivation.reasons)
        return _derived_rule(type(module), _model_type(module)).not_applicable_reasons(module)

    def make_replacement(self, options):  # the engine patches through for_module's rule
        raise TypeError("GenericMergeRule patches through the rule for_module() returns")

    def coverage_row(self) -> dict[str, str]:
        row = super().coverage_row()
        row["modalities"] = "image / video / audio (`<kind>_token_id` / `<kind>_token_index`)"
        row["features"] = "`get_<kind>_features`, called as the forward calls it (read from its source)"
        return row


def _model_type(module: torch.nn.Module) -> str:
    return module.config.model_type


@functools.lru_cache(maxsize=None)
def _derived_rule(cls: type, model_type: str) -> MergeRule:
    spec = derive_merge_spec(cls).spec
    return MergeRule(dataclasses.replace(spec, model_type=model_type))


@functools.lru_cache(maxsize=None)
def installed_coverage(spec_model_types: frozenset[str]) -> tuple[tuple[str, str, Derivation], ...]:
    """``(model_type, class name, derivation)`` for every base model class of the installed
    transformers (``MODEL_MAPPING_NAMES``) that has ``get_placeholder_mask`` and merges its
    media in its own forward, except the ``model_type`` s a spec names. Only the modeling
    files that define ``get_placeholder_mask`` are imported (about 100 of 600)."""
    try:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES
    except ImportError:
        return ()
    import importlib.util

    root = importlib.util.find_spec("transformers.models").submodule_search_locations[0]
    import pathlib

    defining = {
        path.stem[len("modeling_"):]
        for path in pathlib.Path(root).glob("*/modeling_*.py")
        if "def get_placeholder_mask" in path.read_text(encoding="utf-8", errors="replace")
    }
    rows = []
    for model_type, names in sorted(MODEL_MAPPING_NAMES.items()):
        if model_type in spec_model_types:
            continue
        for name in names if isinstance(names, (tuple, list)) else (names,):
            module = getattr(transformers, name, None).__module__ if _importable(transformers, name) else ""
            if module.rsplit(".modeling_", 1)[-1] not in defining:
                continue
            cls = getattr(transformers, name)
            if not callable(getattr(cls, "get_placeholder_mask", None)):
                continue
            derivation = derive_merge_spec(cls)
            if derivation.merges_here:
                rows.append((model_type, name, derivation))
    return tuple(rows)


def _importable(transformers, name: str) -> bool:
    try:
        getattr(transformers, name)
        return True
    except Exception:  # a class whose optional backend is missing (torchaudio, ...) raises on access
        return False


def coverage_tables(spec_model_types: frozenset[str], merged_since: Callable[[str], str] | None = None) -> str:
    """Markdown: the installed transformers' model types the generic rule patches (with
    the media and the feature calls it read, and ``merged_since(model_type)``: the
    releases it merges them in), and those it refuses, with the reason."""
    rows = installed_coverage(spec_model_types)
    try:
        import transformers

        version = transformers.__version__
    except ImportError:
        return ""
    patched = [r for r in rows if r[2].spec is not None]
    refused = [r for r in rows if r[2].spec is None]

    def call(m: Modality) -> str:
        args = [*m.positional, *(f"{k}=" for k in m.keywords), *(["**kwargs"] if m.passes_forward_kwargs else [])]
        return f"{m.kind}: `{m.feature_method}({', '.join(args)})`"

    lines = [f"Merged by the generic rule on transformers {version} ({len(patched)} model types):", "",
             "| HF `model_type` | patched class | media: feature call | `input_ids` to the forward | merged on transformers |",
             "|---|---|---|---|---|"]  # fmt: skip
    for model_type, name, derivation in patched:
        spec = derivation.spec
        media = "; ".join(call(m) for m in spec.modalities)
        since = merged_since(model_type) if merged_since is not None else ""
        lines.append(f"| {model_type} | {name} | {media} | {'kept' if spec.keeps_input_ids else 'dropped'} | {since} |")
    lines += ["", f"Not merged (the forward does more with its media than the shared pattern; a spec "
                  f"would be needed), transformers {version} ({len(refused)}):", "",
              "| HF `model_type` | class | why |", "|---|---|---|"]  # fmt: skip
    for model_type, name, derivation in refused:
        reason = derivation.reasons[0].replace("|", "\\|")
        lines.append(f"| {model_type} | {name} | {reason} |")
    return "\n".join(lines) + "\n"
