"""mmkernels.patch on live Hugging Face models: the tiny models of :mod:`mmkernels.zoo`,
patched with the merge kernel (run by Triton's interpreter on the CPU).

For every zoo family that has a spec: patched and unpatched forwards give bit-identical
outputs in fp32 (logits and every output field, encoder outputs included), greedy
generation gives the same tokens, ``save_pretrained`` writes the same checkpoint,
``unpatch`` restores the instance exactly, patching twice changes nothing, the report
names the patched module, and the host syncs of a forward drop by the merge's own: one
sync left with ``check_placeholders=True`` and none from the merge with False.

Then the front door's contract on its own: unknown models, ``strict``, bad ``kernels``,
``quantize_projector``, the coverage table, ``deepcopy``, pickling (``pickle``, ``torch.save``),
training (gradients) and text-only calls,
and the Qwen2-Audio legacy input format.
"""

import copy  # noqa: E402
import dataclasses  # noqa: E402
import inspect  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import re  # noqa: E402
import types  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

import mmkernels  # noqa: E402
import mmkernels.ops  # noqa: E402
from mmkernels import integrations, zoo  # noqa: E402
from mmkernels import patch, supported_models, unpatch  # noqa: E402  (the front door)
from mmkernels.integrations import PatchReport  # noqa: E402
from mmkernels.integrations.engine import ORIGINALS_ATTR, original_method  # noqa: E402
from mmkernels.testing import HostSyncCounter  # noqa: E402
from zoo_helpers import assert_same_output, build_or_skip, patched  # noqa: E402

RULES = integrations.rules()
# The merge's rules; this file tests patch(kernels=MERGE) (test_patch_embed_hf.py the rest).
MERGE = ("merge",)
MERGE_RULES = [rule for rule in RULES if rule.kernel == "merge"]
SPEC_MODEL_TYPES = {rule.model_type for rule in MERGE_RULES}
# Zoo families are named by their model_type.
FAMILIES = [family for family in zoo.FAMILIES if family in SPEC_MODEL_TYPES]
NEW_TOKENS = 4


# --------------------------------------------------------------------------------------
# Helpers


def generate(tiny) -> torch.Tensor:
    return tiny.model.generate(**tiny.inputs, max_new_tokens=NEW_TOKENS, do_sample=False)


def instance_dicts(model) -> dict[str, dict]:
    """A shallow copy of every module's instance __dict__, by module path."""
    return {path: dict(module.__dict__) for path, module in model.named_modules()}


def assert_same_instance_dicts(got: dict[str, dict], want: dict[str, dict]) -> None:
    assert got.keys() == want.keys()
    for path in want:
        differ = got[path].keys() ^ want[path].keys()
        assert not differ, f"{path or '<root>'}: attributes {differ} differ"
        for name, value in want[path].items():
            assert got[path][name] is value, f"{path or '<root>'}.{name} is a different object"


def inner_paths(tiny) -> list[str]:
    return [path for path, m in tiny.model.named_modules() if type(m).__name__ == tiny.inner_model_class]


def merge_replacements(tiny) -> list[tuple[str, str]]:
    """(path, class) of every module patch(kernels=MERGE) replaces a method of: the inner
    model, and where its spec hands the language model derived inputs (Qwen3-VL's
    deepstack), that language model too."""
    found = []
    for path in inner_paths(tiny):
        found.append((path, tiny.inner_model_class))
        spec = next((r.spec for r in MERGE_RULES if r.model_class == tiny.inner_model_class
                     and getattr(r.spec, "language_model_inputs", None) is not None), None)  # fmt: skip
        if spec is not None:
            lm = spec.language_model_inputs
            found.append((f"{path}.{lm.attribute}", lm.model_class))
    return found


def drop_one_placeholder(tiny) -> dict:
    """The inputs with the first placeholder token replaced by a text token."""
    inputs = dict(tiny.inputs)
    ids = inputs["input_ids"].clone()
    placeholder = next(iter(tiny.placeholder_ids.values()))
    first = (ids == placeholder).nonzero()[0]
    ids[tuple(first)] = tiny.tokenizer.convert_tokens_to_ids("the")
    inputs["input_ids"] = ids
    return inputs


@dataclasses.dataclass
class Baseline:
    """A tiny model and what it does unpatched (computed once per family)."""

    tiny: Any
    output: Any
    tokens: torch.Tensor
    syncs: HostSyncCounter
    hf_checks_counts: bool  # the unpatched forward rejects a placeholder count mismatch
    state: dict[str, torch.Tensor]


@pytest.fixture(scope="module", params=FAMILIES)
def baseline(request) -> Baseline:
    tiny = build_or_skip(request.param)
    model = tiny.model
    (rule,) = [rule for rule in MERGE_RULES if rule.model_type == request.param]
    covered = rule.covered_modalities()
    uncovered = [m.kind for m in rule.spec.modalities if m not in covered and m.trigger in tiny.inputs]
    if uncovered:
        pytest.skip(f"{'/'.join(uncovered)} not covered on transformers {transformers.__version__}: the original runs")
    with torch.no_grad():
        output = model(**tiny.inputs)
        with HostSyncCounter() as syncs:
            model(**tiny.inputs)
        tokens = generate(tiny)
        try:
            model(**drop_one_placeholder(tiny))
            hf_checks_counts = False  # Idefics3 before 5.24 scatters without a check
        except ValueError:
            hf_checks_counts = True
    return Baseline(
        tiny=tiny,
        output=output,
        tokens=tokens,
        syncs=syncs,
        hf_checks_counts=hf_checks_counts,
        state={k: v.clone() for k, v in model.state_dict().items()},
    )


# --------------------------------------------------------------------------------------
# Per family


def test_zoo_families_with_a_spec():
    assert FAMILIES, f"no zoo family has a merge spec (zoo: {zoo.FAMILIES})"


@pytest.mark.parametrize("check", [True, False], ids=["check", "nocheck"])
def test_forward_bit_identical(baseline, merge_spy, check):
    tiny = baseline.tiny
    with torch.no_grad(), patched(tiny.model, check_placeholders=check) as report:
        assert [(r.module_path, r.class_name) for r in report.replaced] == merge_replacements(tiny)
        output = tiny.model(**tiny.inputs)
    assert merge_spy.calls == 1, "the patched forward must merge with one op call"
    assert_same_output(output, baseline.output)


def test_generate_same_tokens(baseline, merge_spy):
    tiny = baseline.tiny
    with torch.no_grad(), patched(tiny.model):
        tokens = generate(tiny)
    # Only the prefill carries media; decode steps run the original forward.
    assert merge_spy.calls == 1
    assert torch.equal(tokens, baseline.tokens), f"{tokens} vs {baseline.tokens}"


def test_save_pretrained_writes_the_same_checkpoint(baseline, tmp_path):
    from safetensors.torch import load_file

    model = baseline.tiny.model
    model.save_pretrained(tmp_path / "unpatched")
    with patched(model):
        assert list(model.state_dict().keys()) == list(baseline.state.keys())
        for key, value in model.state_dict().items():
            assert torch.equal(value, baseline.state[key]), key
        model.save_pretrained(tmp_path / "patched")
    want = sorted(p.name for p in (tmp_path / "unpatched").iterdir())
    assert sorted(p.name for p in (tmp_path / "patched").iterdir()) == want
    for name in want:
        a, b = tmp_path / "unpatched" / name, tmp_path / "patched" / name
        if name.endswith(".safetensors"):
            got, expected = load_file(b), load_file(a)
            assert got.keys() == expected.keys()
            for key in expected:
                assert torch.equal(got[key], expected[key]), f"{name}: {key}"
        elif name.endswith(".json"):
            assert json.loads(b.read_text()) == json.loads(a.read_text()), name
        else:
            assert b.read_bytes() == a.read_bytes(), name


def test_unpatch_restores_exactly(baseline):
    tiny = baseline.tiny
    model = tiny.model
    before = instance_dicts(model)
    patch(model, kernels=MERGE)
    inner = model.get_submodule(inner_paths(tiny)[0])
    assert "forward" in inner.__dict__ and ORIGINALS_ATTR in inner.__dict__
    unpatch(model)
    assert_same_instance_dicts(instance_dicts(model), before)
    assert inner.forward.__func__ is type(inner).forward

    # After patched calls too (their own state, such as Qwen2-VL's rope_deltas, may change).
    with torch.no_grad():
        with patched(model):
            model(**tiny.inputs)
        assert {p: d.keys() for p, d in instance_dicts(model).items()} == {p: d.keys() for p, d in before.items()}
        assert inner.forward.__func__ is type(inner).forward
        assert_same_output(model(**tiny.inputs), baseline.output)
    before = instance_dicts(model)
    unpatch(model)  # no-op on an unpatched model
    assert_same_instance_dicts(instance_dicts(model), before)


def test_patch_twice_is_a_noop(baseline):
    tiny = baseline.tiny
    before = instance_dicts(tiny.model)
    with patched(tiny.model) as first:
        after_first = instance_dicts(tiny.model)
        second = patch(tiny.model, kernels=MERGE, check_placeholders=False)
        assert second.replaced == []
        assert [s.module_path for s in second.already_patched] == [r.module_path for r in first.replaced]
        assert "already patched" in str(second)
        assert_same_instance_dicts(instance_dicts(tiny.model), after_first)
    assert_same_instance_dicts(instance_dicts(tiny.model), before)


def test_report_names_every_patched_module(baseline):
    tiny = baseline.tiny
    with patched(tiny.model) as report:
        assert isinstance(report, PatchReport)
        paths = [path for path, _ in merge_replacements(tiny)]
        assert [(r.module_path, r.class_name, r.method) for r in report.replaced] == [
            (path, class_name, "forward") for path, class_name in merge_replacements(tiny)
        ]
        assert {s.code for s in report.skipped} <= {"not_requested"}  # the other kernels
        text = str(report)
        for path in paths:
            assert path in text
        assert tiny.inner_model_class in text and "merge_multimodal_embeddings" in text


def test_host_syncs(baseline, merge_spy, record_property):
    """The merge's host syncs are gone: one left with check_placeholders=True (the count
    check), none with False; the op alone makes none with check=False. The counts go to
    the JUnit XML (``record_property``)."""
    tiny = baseline.tiny
    counts = {}
    with torch.no_grad():
        for check in (True, False):
            with patched(tiny.model, check_placeholders=check):
                with HostSyncCounter() as syncs:
                    tiny.model(**tiny.inputs)
            counts[check] = syncs
        args, kwargs = merge_spy.last
        op_syncs = {}
        for check in (True, False):
            with HostSyncCounter() as syncs:
                mmkernels.ops.merge_multimodal_embeddings(*args, **{**kwargs, "check": check})
            op_syncs[check] = syncs.count
    record_property(
        "host_syncs",
        {
            "unpatched": baseline.syncs.count,
            "patched_check": counts[True].count,
            "patched_nocheck": counts[False].count,
            "op_check": op_syncs[True],
            "op_nocheck": op_syncs[False],
        },
    )
    assert op_syncs[False] == 0, "the merge op must not sync with check=False"
    assert op_syncs[True] == 1, "the merge op's count check is one sync"
    # Hugging Face's count check costs at least one sync; where it has none, no more syncs.
    saved = 1 if baseline.hf_checks_counts else 0
    assert counts[False].count <= baseline.syncs.count - saved, (baseline.syncs, counts[False])
    assert counts[True].count == counts[False].count + 1, (counts[True], counts[False])


def count_mismatch_pattern(message: str) -> str:
    """A regular expression of a spec's count mismatch message: its words as they are, the
    kind and the counts as fields."""
    fields = {"Kind": r"\w+", "kind": r"\w+", "tokens": r"\d+", "features": r"\d+", "feature_values": r"\d+"}
    parts = re.split(r"\{(\w+)\}", message)  # text, field, text, ...
    return "^" + "".join(fields[part] if i % 2 else re.escape(part) for i, part in enumerate(parts)) + "$"


def test_count_mismatch_raises_with_check(baseline, merge_spy):
    tiny = baseline.tiny
    inputs = drop_one_placeholder(tiny)
    (rule,) = [rule for rule in MERGE_RULES if rule.model_type == tiny.family]
    with torch.no_grad(), patched(tiny.model):
        with pytest.raises(ValueError, match=count_mismatch_pattern(rule.spec.count_mismatch_message)):
            tiny.model(**inputs)
    assert merge_spy.calls == 1


# --------------------------------------------------------------------------------------
# The front door


@pytest.fixture(scope="module")
def llava():
    return zoo.build("llava", batch=1)


@pytest.fixture(scope="module")
def text_model():
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def test_text_model_strict_raises_and_lenient_reports_why(text_model):
    with pytest.raises(ValueError) as excinfo:
        patch(text_model, strict=True)
    message = str(excinfo.value)
    assert "strict" in message and "llama" in message and "llava" in message and "qwen2_vl" in message
    assert ORIGINALS_ATTR not in text_model.__dict__

    report = patch(text_model)
    assert report.replaced == []
    assert [s.code for s in report.skipped] == ["no_match"]
    text = str(report)
    assert "no sub-model matches a spec" in text and "llama" in text
    assert all(ORIGINALS_ATTR not in m.__dict__ for m in text_model.modules())


@pytest.mark.parametrize("encoded", ["empty", "image"])
def test_pixels_beside_encoder_outputs_run_the_original(llava, encoded):
    """Pixels and mm_encoder_outputs in one call (an empty dict, or the image's own output):
    the forward raises its error, and the patched model raises the same (the original runs)."""
    if "mm_encoder_outputs" not in inspect.signature(type(llava.model.model).forward).parameters:
        pytest.skip("this transformers' LLaVA forward takes no mm_encoder_outputs")
    model, inputs = llava.model, dict(llava.inputs)
    outputs = {} if encoded == "empty" else {"image": model.model.get_image_features(inputs["pixel_values"],
                                                                                     return_dict=True)}  # fmt: skip
    errors = []
    for patched in (False, True):
        if patched:
            patch(model, kernels=["merge"])
        try:
            with pytest.raises(ValueError) as excinfo, torch.no_grad():
                model(**inputs, mm_encoder_outputs=dict(outputs))
            errors.append(str(excinfo.value))
        finally:
            if patched:
                unpatch(model)
    assert errors[0] == errors[1] and "mm_encoder_outputs" in errors[0]


def test_kernels_argument(llava):
    model = llava.model
    with pytest.raises(ValueError, match=r"kernels.*'flash'.*known.*'merge'"):
        patch(model, kernels=["merge", "flash"])
    with pytest.raises(TypeError, match="kernels"):
        patch(model, kernels=3)
    assert all(ORIGINALS_ATTR not in m.__dict__ for m in model.modules())

    report = patch(model, kernels=[])
    assert report.replaced == [] and {s.code for s in report.skipped} == {"not_requested"}
    assert "not requested" in str(report)
    with pytest.raises(ValueError, match="strict"):
        patch(model, kernels=[], strict=True)
    with patched(model, kernels="merge") as report:
        assert [r.class_name for r in report.replaced] == ["LlavaModel"]
    with patched(model, kernels=("merge",), strict=True) as report:
        assert len(report.replaced) == 1


def test_quantize_projector_bad_scheme_changes_nothing(llava):
    with pytest.raises(ValueError, match="quantize_projector: expected one of"):
        patch(llava.model, quantize_projector="w3a16")
    assert all(ORIGINALS_ATTR not in m.__dict__ for m in llava.model.modules())


def test_front_door_forwards(llava):
    report = mmkernels.patch(llava.model)
    try:
        assert isinstance(report, PatchReport)
        assert [r.class_name for r in report.replaced] == ["LlavaModel", "CLIPVisionEmbeddings"]
    finally:
        mmkernels.unpatch(llava.model)
    assert all(ORIGINALS_ATTR not in m.__dict__ for m in llava.model.modules())


def test_supported_models_table():
    table = supported_models()
    assert table == supported_models()
    rules_table = table.split("\n\n")[0]  # the generic rule's tables follow (tests/test_generic_merge.py)
    lines = rules_table.strip().splitlines()
    assert lines[0].startswith("| family |") and set(lines[1]) <= set("|-")
    assert len(lines) == 2 + len(RULES)
    for rule, line in zip(RULES, lines[2:]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:4] == [rule.family, rule.model_type, rule.model_class, "forward"]
        if rule.kernel == "merge":
            assert "merge_multimodal_embeddings" in line
    for family in FAMILIES:
        assert f"| {family} |" in table
    assert "`image_token_id` / `image_token_index`" in table and "`audio_token_id`" in table


def test_deepcopy_of_a_patched_model_runs_the_copy(llava):
    with torch.no_grad(), patched(llava.model):
        want = llava.model(**llava.inputs).logits
        clone = copy.deepcopy(llava.model)
        assert clone.model.forward.__self__ is clone.model
        assert_same_output(clone(**llava.inputs).logits, want)
        clone.model.multi_modal_projector.linear_2.weight.zero_()
        assert not torch.equal(clone(**llava.inputs).logits, want)  # the copy's weights ran
        assert torch.equal(llava.model(**llava.inputs).logits, want)
    unpatch(clone)
    assert ORIGINALS_ATTR not in clone.model.__dict__ and "forward" not in clone.model.__dict__


def _copied(model, how):
    if how == "pickle":
        return pickle.loads(pickle.dumps(model))
    if how == "torch.save":
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)
    return copy.deepcopy(model)


@pytest.mark.parametrize("how", ["pickle", "torch.save", "deepcopy"])
def test_pickled_or_copied_patched_model_stays_patched(merge_spy, monkeypatch, how):
    """Issue 15: after pickle.loads(pickle.dumps(model)) the forward was the class's while
    the record still said "patched" (patch() refused it). The copy is patched as the
    original was, through the engine: same kernels, bit-identical outputs, its own
    replacements (bound to it), patch() says "already patched", and unpatch / patch work."""
    embed_calls = []
    embed = mmkernels.ops.patch_embed
    monkeypatch.setattr(mmkernels.ops, "patch_embed", lambda *a, **k: embed_calls.append(1) or embed(*a, **k))
    # A fresh model, copied before its first forward: transformers (5.25) then hooks a
    # local function onto the vision layers, which pickle refuses, patched or not.
    tiny = zoo.build("llava", batch=1)
    model = tiny.model
    with torch.no_grad():
        with patched(model, kernels=None) as report:
            clone = _copied(model, how)
            want = model(**tiny.inputs).logits
        unpatched = model(**tiny.inputs).logits
        paths = [r.module_path for r in report.replaced]
        assert {"model", "model.vision_tower.embeddings"} <= set(paths)
        for path in paths:
            module = clone.get_submodule(path)
            assert module.forward.__self__ is module and module.forward.__qualname__.startswith("mmkernels")
            assert module.forward.__func__ is not model.get_submodule(path).forward.__func__  # its own replacement
        merge_spy.reset()
        embed_calls.clear()
        assert_same_output(clone(**tiny.inputs).logits, want)
        assert merge_spy.calls == 1 and len(embed_calls) == 1
        assert list(clone.state_dict()) == list(model.state_dict())
        again = patch(clone)
        assert again.replaced == [] and sorted(s.module_path for s in again.already_patched) == sorted(paths)
        unpatch(clone)
        assert all(name not in m.__dict__ for m in clone.modules()
                   for name in (ORIGINALS_ATTR, "forward", "__reduce_ex__"))  # fmt: skip
        assert_same_output(clone(**tiny.inputs).logits, unpatched)
        assert [r.module_path for r in patch(clone, kernels=None).replaced] == paths
        assert_same_output(clone(**tiny.inputs).logits, want)


class _ToyConfig:
    model_type = "toy"


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = _ToyConfig()
        self.scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return x * self.scale


def _plus_one(self, x):
    """Another library's instance patch, there before mmkernels'."""
    return type(self).forward(self, x) + 1


class _ToyRule(integrations.Rule):
    kernel, family, model_type, model_class, method, op = "toy", "Toy", "toy", "_Toy", "forward", "toy"

    def make_replacement(self, options):
        def forward(module, x):
            return original_method(module, "forward")(x) * 10

        return forward


@pytest.mark.parametrize("earlier_patch", [False, True], ids=["class-forward", "instance-forward"])
@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_pickled_module_wraps_what_it_wrapped(earlier_patch, how):
    """The engine alone: the copy's replacement wraps what the original's did. An earlier
    instance patch bound to the module comes back bound to the copy (pickled as a bound
    method it came back as the new replacement, which then called itself)."""
    from mmkernels.integrations.engine import PatchOptions, patch_model, unpatch_model

    toy = _Toy()
    if earlier_patch:
        toy.forward = types.MethodType(_plus_one, toy)
    x = torch.tensor([1.0, 3.0])
    before = toy(x)
    (replaced,) = patch_model(toy, [_ToyRule()], kernels=["toy"], options=PatchOptions()).replaced
    clone = _copied(toy, how)
    assert torch.equal(clone(x), before * 10) and torch.equal(toy(x), before * 10)
    clone.scale.data.fill_(3.0)  # the copy's own parameter
    assert torch.equal(clone(x), (x * 3 + earlier_patch) * 10) and torch.equal(toy(x), before * 10)
    assert unpatch_model(clone) == 1
    assert torch.equal(clone(x), x * 3 + earlier_patch)
    assert set(clone.__dict__) - set(toy.__dict__) == set()
    if earlier_patch:
        assert clone.forward.__func__ is _plus_one and clone.forward.__self__ is clone
    else:
        assert "forward" not in clone.__dict__ and "__reduce_ex__" not in clone.__dict__


def test_shallow_copy_of_a_patched_module_is_bound_to_the_copy(llava):
    embeddings = llava.model.model.vision_tower.embeddings
    with patched(embeddings, kernels=["patch_embed"]):
        clone = copy.copy(embeddings)
        assert clone.forward.__self__ is clone and ORIGINALS_ATTR in clone.__dict__
        assert clone.__dict__[ORIGINALS_ATTR] is not embeddings.__dict__[ORIGINALS_ATTR]
    assert embeddings.forward.__func__ is type(embeddings).forward
    unpatch(clone)
    assert "forward" not in clone.__dict__


def test_training_runs_the_merge_with_the_same_gradients(llava, merge_spy):
    """The op is differentiable: with gradients needed the patched path runs, and every
    parameter gets the gradient the unpatched model gives it."""
    model = llava.model

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        logits = model(**llava.inputs).logits
        (logits.square().mean()).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want_logits, want_grads = loss_and_grads()
    with patched(model):
        logits, grads = loss_and_grads()
    model.zero_grad(set_to_none=True)
    assert merge_spy.calls == 1
    assert torch.equal(logits, want_logits)
    assert grads.keys() == want_grads.keys()
    assert "model.multi_modal_projector.linear_1.weight" in grads
    for name, grad in grads.items():
        # Summation order in the embedding backward may differ: a few fp32 ulps.
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_text_only_call_runs_the_original(llava, merge_spy):
    inputs = {k: v for k, v in llava.inputs.items() if k != "pixel_values"}
    ids = inputs["input_ids"]
    text_token = llava.tokenizer.convert_tokens_to_ids("the")
    inputs["input_ids"] = ids.masked_fill(ids == llava.placeholder_ids["image"], text_token)
    with torch.no_grad():
        want = llava.model(**inputs)
        with patched(llava.model):
            got = llava.model(**inputs)
    assert merge_spy.calls == 0
    assert_same_output(got, want)


def test_positional_call_and_tuple_output(llava, merge_spy):
    """The pre-step binds positional calls and honours return_dict=False like HF does."""
    inner = llava.model.model
    ids, pixels = llava.inputs["input_ids"], llava.inputs["pixel_values"]
    with torch.no_grad():
        want = inner(ids, pixels, return_dict=False)
        with patched(llava.model):
            got = inner(ids, pixels, return_dict=False)
    assert merge_spy.calls == 1
    assert isinstance(got, tuple)
    assert_same_output(got, want)


@pytest.mark.skipif("qwen2_audio" not in FAMILIES, reason="no Qwen2-Audio tiny model")
def test_qwen2_audio_legacy_inputs_run_the_original(merge_spy):
    """Unexpanded audio tokens (one per audio): the original forward expands them itself."""
    tiny = zoo.build("qwen2_audio")
    audio = tiny.placeholder_ids["audio"]
    pad = tiny.tokenizer.pad_token_id
    rows = []
    for ids in tiny.inputs["input_ids"]:
        keep = torch.ones_like(ids, dtype=torch.bool)
        keep[1:] = ~((ids[1:] == audio) & (ids[:-1] == audio))  # keep the first of each run
        rows.append(ids[keep & (ids != pad)])
    length = max(len(r) for r in rows)
    input_ids = torch.stack([torch.cat([torch.full((length - len(r),), pad), r]) for r in rows])
    inputs = {**tiny.inputs, "input_ids": input_ids, "attention_mask": (input_ids != pad).long()}
    with torch.no_grad():
        want = tiny.model(**inputs)
        with patched(tiny.model):
            got = tiny.model(**inputs)
    assert merge_spy.calls == 0
    assert_same_output(got, want)


def tiny_aria():
    """Aria is not in the zoo (its MoE text model and query projector): a tiny one here,
    with input_ids laid out by hand (8 query tokens per 56x56 image)."""
    torch.manual_seed(0)
    vision = dict(model_type="idefics3_vision", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, image_size=56, patch_size=14)  # fmt: skip
    text = transformers.AriaTextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, moe_num_experts=4, moe_topk=2, moe_num_shared_experts=1, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    config = transformers.AriaConfig(
        vision_config=vision, text_config=text, projector_patch_to_query_dict={16: 8}, image_token_index=9
    )
    model = transformers.AriaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = 0
    ids = torch.randint(10, 120, (2, 30), generator=torch.Generator().manual_seed(0))
    ids[0, 2:10] = 9
    ids[1, 5:13] = 9
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                  pixel_mask=torch.ones(2, 56, 56, dtype=torch.bool))  # fmt: skip
    return model, inputs


@pytest.mark.skipif(not hasattr(transformers, "AriaForConditionalGeneration"), reason="no Aria in transformers")
def test_aria(merge_spy):
    model, inputs = tiny_aria()
    with torch.no_grad():
        want = model(**inputs)
        with HostSyncCounter() as unpatched_syncs:
            model(**inputs)
        want_tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        for check in (True, False):
            with patched(model, check_placeholders=check) as report:
                assert [(r.module_path, r.class_name) for r in report.replaced] == [("model", "AriaModel")]
                merge_spy.reset()
                with HostSyncCounter() as syncs:
                    got = model(**inputs)
                assert merge_spy.calls == 1
                assert_same_output(got, want)
                assert syncs.count <= unpatched_syncs.count - (0 if check else 1), (unpatched_syncs, syncs)
                if check:
                    tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
                    assert torch.equal(tokens, want_tokens)
    assert all(ORIGINALS_ATTR not in m.__dict__ for m in model.modules())


@pytest.mark.skipif("gemma3" not in FAMILIES, reason="no Gemma 3 tiny model")
def test_placeholder_id_outside_the_vocabulary(merge_spy):
    """Gemma 3 and PaliGemma accept an image token id past the embedding table (they look up
    row 0 there); the patched forward must too, with the scaled embedding run first."""
    tiny = zoo.build("gemma3", batch=1)
    config = tiny.model.model.config
    old = tiny.placeholder_ids["image"]
    new = tiny.model.get_input_embeddings().num_embeddings + 5
    ids = tiny.inputs["input_ids"]
    inputs = {**tiny.inputs, "input_ids": ids.masked_fill(ids == old, new)}
    config.image_token_id = new
    with torch.no_grad():
        want = tiny.model(**inputs)
        with patched(tiny.model):
            got = tiny.model(**inputs)
    assert merge_spy.calls == 1
    assert_same_output(got, want)


@pytest.mark.parametrize("family", ["glm4v", "glm46v"])
def test_glm4v_video_alone_merges_and_images_with_video_run_the_original(family, merge_spy):
    """GLM-4.1V's and GLM-4.6V's video frames take the image token: a video alone is merged
    (bit-identical, M-RoPE positions from the model's own compute_3d_position_ids); images
    and a video in one call run the original forward."""
    if family not in FAMILIES:
        pytest.skip(f"no {family} tiny model with a spec")
    tiny = build_or_skip(family, batch=1)
    tokens = 4  # one temporal patch of a 4x4 grid, 2x2 merged
    text = "user : <|begin_of_video|>" + "<|image|>" * tokens + "<|end_of_video|> describe the clip . assistant :"
    encoded = tiny.tokenizer([text], return_tensors="pt")
    ids = encoded["input_ids"]
    video = {
        "input_ids": ids,
        "attention_mask": encoded["attention_mask"],
        "mm_token_type_ids": (ids == tiny.placeholder_ids["image"]).long() * 2,
        "pixel_values_videos": torch.randn(16, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0)),
        "video_grid_thw": torch.tensor([[1, 4, 4]]),
    }
    with torch.no_grad():
        want = tiny.model(**video)
        with patched(tiny.model):
            got = tiny.model(**video)
    assert merge_spy.calls == 1
    assert_same_output(got, want)

    # Both kinds fill the same image-token rows: the original forward decides what that
    # means (here its count checks pass and the video's rows overwrite the image's), and
    # the patched model runs it unchanged.
    both = {**video, "pixel_values": tiny.inputs["pixel_values"], "image_grid_thw": tiny.inputs["image_grid_thw"]}
    with torch.no_grad():
        want = tiny.model(**both)
        with patched(tiny.model):
            got = tiny.model(**both)
    assert merge_spy.calls == 1  # the original ran
    assert_same_output(got, want)


@pytest.mark.parametrize(("sibling", "tested"), [
    ("Qwen3VLMoeModel", "Qwen3VLModel"),  # no tiny model of its own: its forward is the tested one's
    ("Glm4vMoeModel", "Glm4vModel"),
    ("GlmOcrModel", "Glm4vModel"),
    ("MiniCPMOcrModel", "MiniCPMV4_6Model"),
])  # fmt: skip
def test_spec_families_without_a_tiny_model_run_a_tested_forward(sibling, tested):
    """A spec whose family has no zoo model is a claim about its forward: that it is the
    forward of a family the zoo tests (the same code but for class names), in this
    transformers; checked here, so a release that changes one fails instead of merging
    wrongly."""
    import inspect
    import re

    transformers = pytest.importorskip("transformers")
    classes = [getattr(transformers, name, None) for name in (sibling, tested)]
    if None in classes:
        pytest.skip(f"transformers {transformers.__version__} lacks one of {sibling}, {tested}")

    def normalized(cls, method):
        prefix = cls.__name__.removesuffix("Model")
        source = inspect.getsource(getattr(cls, method))
        # The output class first: its name may start with the family's prefix.
        return re.sub(rf"\b\w*ModelOutputWithPast\b|\b{prefix}(Moe)?(?=[A-Z_])", "X", source)

    for method in ("forward", "get_placeholder_mask", "get_image_features", "get_video_features"):
        assert normalized(classes[0], method) == normalized(classes[1], method), f"{sibling}.{method}"


@pytest.mark.skipif("molmo2" not in FAMILIES, reason="no Molmo2 tiny model")
def test_molmo2_images_after_cached_tokens_run_the_original(merge_spy):
    """Molmo2 adds its image features to the placeholders' embeddings (the merged prefill is
    bit-identical: test_forward_bit_identical); a call with images whose cache already holds
    tokens runs the original forward, which still builds the image block mask because the
    images came (taken out, they would not)."""
    tiny = build_or_skip("molmo2", batch=1)
    model, inputs = tiny.model, tiny.inputs
    with torch.no_grad():
        first = model(**inputs, use_cache=True)
        want = model(**inputs, cache=copy.deepcopy(first.past_key_values))
        with patched(model):
            calls = merge_spy.calls
            got = model(**inputs, cache=copy.deepcopy(first.past_key_values))
            assert merge_spy.calls == calls  # the original ran
            model(**inputs)
            assert merge_spy.calls == calls + 1  # a prefill merges
    assert_same_output(got, want)
