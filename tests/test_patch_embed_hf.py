"""mmkernels.patch(kernels=["patch_embed"]) on live Hugging Face models: the vision
embeddings of the tiny models of :mod:`mmkernels.zoo` (CLIP, SigLIP, BLIP-2, ViT in
VisionEncoderDecoder, Qwen2-VL and Qwen2.5-VL ``PatchEmbed``) computed by :func:`mmkernels.ops.patch_embed` (Triton's
interpreter on the CPU).

For every zoo family with a wired module: the report names exactly that module, patched
and unpatched outputs agree within fp32 rounding (relative error <= 1e-5 on every output
tensor; not bit-identical, the GEMM sums in another order), greedy generation gives the
same tokens, ``state_dict`` is unchanged, ``unpatch`` restores the instance exactly, and
``patch(model)`` with every kernel patches the merge and the embeddings together.

Then the cases the patched forward leaves to the original (gradients, a wrong image size,
a hooked projection, unknown arguments, other input shapes), interpolated position
embeddings, bf16, and the engine's matching of config-less modules (Qwen2-VL's
``PatchEmbed``) under their vision tower's ``model_type`` only. Last, the towers whose
embeddings are copies of a covered class (GIT, Kosmos-2, Granite Docling, InstructBLIP,
InstructBLIP-Video, Qianfan-OCR), each built tiny from its own config class.
"""

import copy  # noqa: E402
import dataclasses  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

import mmkernels  # noqa: E402
import mmkernels.ops  # noqa: E402
from mmkernels import integrations, patch, unpatch, zoo  # noqa: E402
from mmkernels.integrations.engine import ORIGINALS_ATTR  # noqa: E402
from mmkernels.testing import HostSyncCounter, assert_close, relative_error  # noqa: E402
from mmkernels.integrations.hf_attention import ATTENTION_OP as ATTENTION_OP_NAME  # noqa: E402
from zoo_helpers import build_or_skip  # noqa: E402

KERNEL = "patch_embed"
RTOL = 1e-5  # fp32: the op's GEMM sums in another order than the convolution
NEW_TOKENS = 4

# The modules each zoo family's patch-embed rules match: (path, class).
EXPECTED = {
    "llava": [("model.vision_tower.embeddings", "CLIPVisionEmbeddings")],
    "llava_next": [("model.vision_tower.embeddings", "CLIPVisionEmbeddings")],
    "llava_onevision": [("model.vision_tower.embeddings", "SiglipVisionEmbeddings")],
    "qwen2_vl": [("model.visual.patch_embed", "PatchEmbed")],
    "qwen2_5_vl": [("model.visual.patch_embed", "Qwen2_5_VisionPatchEmbed")],
    "paligemma": [("model.vision_tower.embeddings", "SiglipVisionEmbeddings")],
    "gemma3": [("model.vision_tower.embeddings", "SiglipVisionEmbeddings")],
    "blip_2": [("vision_model.embeddings", "Blip2VisionEmbeddings")],
    "vision_encoder_decoder": [("encoder.embeddings", "ViTEmbeddings")],
    "mllama": [("model.vision_model.patch_embedding", "Conv2d")],  # the bare patch conv
    # The generic merge rule's families whose towers are ones the patch-embed rules know.
    "mistral3": [("model.vision_tower.patch_conv", "Conv2d")],  # Pixtral's bare patch conv
    "aya_vision": [("model.vision_tower.embeddings", "SiglipVisionEmbeddings")],
    "cohere2_vision": [("model.vision_tower.embeddings", "SiglipVisionEmbeddings")],
    "qwen3_5": [("model.visual.patch_embed", "Qwen3_5VisionPatchEmbed")],
    "qwen3_vl": [("model.visual.patch_embed", "Qwen3VLVisionPatchEmbed")],
    "glm4v": [("model.visual.patch_embed", "Glm4vVisionPatchEmbed")],
    "llama4": [("vision_model.patch_embedding", "Llama4UnfoldConvolution")],  # unfold + linear
    "janus": [("model.vision_model.embeddings", "JanusVisionEmbeddings")],
    "internvl": [("model.vision_tower.embeddings", "InternVLVisionEmbeddings")],
    "idefics3": [("model.vision_model.embeddings.patch_embedding", "Conv2d")],  # the bare patch conv
    "kimi_k25": [("model.vision_tower.patch_embed.proj", "Conv2d")],  # the bare conv over pre-cut patches
    "minicpmv4_6": [("model.vision_tower.embeddings.patch_embedding", "Conv2d")],  # the bare patch conv
    "minicpmv4_7": [("model.vision_tower.embeddings.patch_embedding", "Conv2d")],
    "paddleocr_vl": [("model.visual.vision_model.embeddings.patch_embedding", "Conv2d")],  # the bare patch conv
    "qwen2_5_omni_thinker": [("model.visual.patch_embed", "Qwen2_5_VisionPatchEmbed")],
    "qwen3_omni_moe_thinker": [("model.visual.patch_embed", "Qwen3OmniMoeVisionPatchEmbed")],
    "glm46v": [("model.visual.patch_embed", "Glm4vVisionPatchEmbed")],  # GLM-4.1V's tower
    "smolvlm": [("model.vision_model.embeddings.patch_embedding", "Conv2d")],  # Idefics3's bare patch conv
    "llava_next_video": [("model.vision_tower.embeddings", "CLIPVisionEmbeddings")],
}
# Ovis2's bare patch conv: its rule is for the tower's own model_type, which releases before
# 5.20.2 do not give it (the tower falls under its parent's 'ovis2': nothing to patch there).
if getattr(getattr(transformers, "Ovis2VisionConfig", None), "model_type", "") == "ovis2_vision":
    EXPECTED["ovis2"] = [("model.vision_tower.transformer.embeddings.patch_embedding", "Conv2d")]
ATTENTION_OP = f"mmkernels.ops.{ATTENTION_OP_NAME}"
ATTENTION_CLASSES = {rule.model_class for rule in integrations.rules() if rule.kernel == "attention"}
FAMILIES = [family for family in zoo.FAMILIES if family in EXPECTED]
UNWIRED = [family for family in zoo.FAMILIES if family not in EXPECTED]


# --------------------------------------------------------------------------------------
# Helpers


@contextmanager
def patched(model, **options):
    options.setdefault("kernels", [KERNEL])
    report = patch(model, **options)
    try:
        yield report
    finally:
        unpatch(model)


class Spy:
    """Counts calls of ``mmkernels.ops.<name>`` (the patches import it at call time)."""

    def __init__(self, monkeypatch, name):
        self.calls = 0
        self._op = getattr(mmkernels.ops, name)
        monkeypatch.setattr(mmkernels.ops, name, self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._op(*args, **kwargs)


@pytest.fixture
def embed_spy(monkeypatch):
    return Spy(monkeypatch, "patch_embed")


def tensor_leaves(value: Any, where: str = "output"):
    """(where, tensor) for every tensor in a model output, caches included."""
    if isinstance(value, torch.Tensor):
        yield where, value
    elif isinstance(value, transformers.utils.ModelOutput):
        for key in value.keys():
            yield from tensor_leaves(value[key], f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from tensor_leaves(item, f"{where}[{i}]")
    elif isinstance(value, transformers.EncoderDecoderCache):  # VisionEncoderDecoder's decoder
        yield from tensor_leaves(value.self_attention_cache, f"{where}.self_attention_cache")
        yield from tensor_leaves(value.cross_attention_cache, f"{where}.cross_attention_cache")
    elif isinstance(value, transformers.Cache):
        for i, layer in enumerate(value.layers):
            pair = [getattr(layer, "keys", None), getattr(layer, "values", None)]
            yield from tensor_leaves(pair, f"{where}.layers[{i}]")


def assert_outputs_close(got: Any, want: Any) -> None:
    got_leaves, want_leaves = dict(tensor_leaves(got)), dict(tensor_leaves(want))
    assert got_leaves.keys() == want_leaves.keys()
    for where, w in want_leaves.items():
        g = got_leaves[where]
        assert (g.dtype, g.shape) == (w.dtype, w.shape), (
            f"{where}: {g.dtype}{tuple(g.shape)} vs {w.dtype}{tuple(w.shape)}"
        )
        if not w.is_floating_point():
            assert torch.equal(g, w), where
            continue
        error = relative_error(g, w)
        assert error <= RTOL, f"{where}: relative error {error:.3e} > {RTOL}"


def instance_dicts(model) -> dict[str, dict]:
    return {path: dict(module.__dict__) for path, module in model.named_modules()}


def assert_same_instance_dicts(got: dict[str, dict], want: dict[str, dict]) -> None:
    assert got.keys() == want.keys()
    for path in want:
        assert got[path].keys() == want[path].keys(), path or "<root>"
        for name, value in want[path].items():
            assert got[path][name] is value, f"{path or '<root>'}.{name} is a different object"


def merge_rules(tiny) -> list:
    """The merge spec rules of the family (none for BLIP-2 and VisionEncoderDecoder): its
    inner model's, and the language model's where the spec hands it derived inputs."""
    return [r for r in integrations.rules()
            if r.kernel == "merge" and getattr(getattr(r, "spec", None), "model_type", None) == tiny.family]  # fmt: skip


def generic_merge(tiny) -> bool:
    """The generic merge rule patches the family (no spec, and its forward reads as the pattern)."""
    from mmkernels.integrations.hf_merge_generic import derive_merge_spec

    if merge_rules(tiny):
        return False
    inner = [m for m in tiny.model.modules() if type(m).__name__ == tiny.inner_model_class]
    return bool(inner) and derive_merge_spec(type(inner[0])).spec is not None


def generate(tiny) -> torch.Tensor:
    return tiny.model.generate(**tiny.inputs, max_new_tokens=NEW_TOKENS, do_sample=False)


@dataclasses.dataclass
class Baseline:
    tiny: Any
    output: Any
    tokens: torch.Tensor
    state_keys: list[str]


@pytest.fixture(scope="module", params=FAMILIES)
def baseline(request) -> Baseline:
    tiny = build_or_skip(request.param)
    with torch.no_grad():
        output = tiny.model(**tiny.inputs)
        tokens = generate(tiny)
    return Baseline(tiny, output, tokens, list(tiny.model.state_dict().keys()))


# --------------------------------------------------------------------------------------
# Per family


def test_the_zoo_has_wired_families():
    assert FAMILIES, f"no zoo family has a patch-embed rule (zoo: {zoo.FAMILIES})"
    assert KERNEL in integrations.KERNELS


def test_forward_close_and_report(baseline, embed_spy):
    tiny = baseline.tiny
    with torch.no_grad(), patched(tiny.model) as report:
        assert [(r.module_path, r.class_name, r.method) for r in report.replaced] == [
            (path, cls, "forward") for path, cls in EXPECTED[tiny.family]
        ]
        assert {r.op for r in report.replaced} == {"mmkernels.ops.patch_embed"}
        # The merge (and the attention rules, where they match) were not requested.
        assert {s.code for s in report.skipped} <= {"not_requested"}
        assert len(report.skipped) >= len(merge_rules(tiny))
        text = str(report)
        for path, cls in EXPECTED[tiny.family]:
            assert path in text and cls in text
        assert "patch_embed" in text and "Triton kernel (interpreter)" in text
        output = tiny.model(**tiny.inputs)
    # One call per encoded medium (Qwen2-VL, LLaVA-OneVision: images and videos).
    assert embed_spy.calls >= 1
    assert_outputs_close(output, baseline.output)


def test_generate_same_tokens(baseline, embed_spy):
    tiny = baseline.tiny
    with torch.no_grad(), patched(tiny.model):
        tokens = generate(tiny)
    assert embed_spy.calls >= 1
    assert torch.equal(tokens, baseline.tokens), f"{tokens} vs {baseline.tokens}"


def test_state_dict_unchanged_and_unpatch_restores(baseline):
    tiny = baseline.tiny
    model = tiny.model
    before = instance_dicts(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with patched(model) as report:
        assert list(model.state_dict().keys()) == baseline.state_keys
        for key, value in model.state_dict().items():
            assert torch.equal(value, state[key]), key
        module = model.get_submodule(report.replaced[0].module_path)
        assert "forward" in module.__dict__ and ORIGINALS_ATTR in module.__dict__
    assert_same_instance_dicts(instance_dicts(model), before)
    assert module.forward.__func__ is type(module).forward

    # After patched calls too (the model's own state, such as Qwen2-VL's rope_deltas, may change).
    with torch.no_grad():
        with patched(model):
            model(**tiny.inputs)
        assert {p: d.keys() for p, d in instance_dicts(model).items()} == {p: d.keys() for p, d in before.items()}
        assert module.forward.__func__ is type(module).forward
        for where, tensor in tensor_leaves(model(**tiny.inputs)):
            assert torch.equal(tensor, dict(tensor_leaves(baseline.output))[where]), where


def test_all_kernels_patch_merge_and_embeddings(baseline, embed_spy, monkeypatch):
    tiny = baseline.tiny
    merge_spy = Spy(monkeypatch, "merge_multimodal_embeddings")
    with torch.no_grad(), patched(tiny.model, kernels=None) as report:
        # Merge and patch embed; the attention rules (tests/test_attention_hf.py) may add theirs.
        replaced = [(r.module_path, r.class_name) for r in report.replaced if r.op != ATTENTION_OP]
        inner = [p for p, m in tiny.model.named_modules() if type(m).__name__ == tiny.inner_model_class]
        merged = [(inner[0], tiny.inner_model_class)] if merge_rules(tiny) or generic_merge(tiny) else []
        # A spec that hands its language model derived inputs (Qwen3-VL's deepstack)
        # replaces that model's forward too.
        merged += [(f"{inner[0]}.{rule.spec.language_model_inputs.attribute}", rule.model_class)
                   for rule in merge_rules(tiny) if getattr(rule.spec, "language_model_inputs", None) is not None
                   and rule.model_class == rule.spec.language_model_inputs.model_class]  # fmt: skip
        order = [path for path, _ in tiny.model.named_modules()]
        assert replaced == sorted(merged + EXPECTED[tiny.family], key=lambda entry: order.index(entry[0]))
        # Beside the attention rules' skips, the generic merge rule's refusal of a forward
        # that merges its own way (BLIP-2's language_model_inputs), with its reason.
        assert [s for s in report.skipped
                if s.class_name not in ATTENTION_CLASSES and not s.reason.startswith("generic rule merge:")] == []  # fmt: skip
        output = tiny.model(**tiny.inputs)
    if merge_rules(tiny):
        # The merge runs where it covers every medium in the inputs on this transformers
        # (LLaVA-OneVision video from 5.18); elsewhere its original forward does.
        merge_rule = next(rule for rule in merge_rules(tiny) if rule.model_type == tiny.family)
        covered = merge_rule.covered_modalities()
        uncovered = [m for m in merge_rule.spec.modalities if m not in covered and m.trigger in tiny.inputs]
        assert merge_spy.calls == (0 if uncovered else 1)
    else:
        assert merge_spy.calls == (1 if generic_merge(tiny) else 0)
    assert embed_spy.calls >= 1
    assert_outputs_close(output, baseline.output)


@pytest.mark.parametrize("family", UNWIRED)
def test_families_without_a_wired_module_patch_nothing(family):
    tiny = build_or_skip(family, batch=1)
    with patched(tiny.model) as report:
        assert report.replaced == []


# --------------------------------------------------------------------------------------
# One embeddings module


@pytest.fixture(scope="module")
def llava():
    return zoo.build("llava", batch=1)


@pytest.fixture(scope="module")
def paligemma():
    return zoo.build("paligemma", batch=1)


@pytest.fixture(scope="module")
def blip_2():
    return zoo.build("blip_2", batch=1)


@pytest.fixture(scope="module")
def vit():
    return zoo.build("vision_encoder_decoder", batch=1)


def embeddings(tiny):
    (path, _), *_ = EXPECTED[tiny.family]
    return tiny.model.get_submodule(path)


def reduction_length(module) -> int:
    """The conv's K = C*P*P (ViT's conv sits in ViTPatchEmbeddings)."""
    conv = module.patch_embeddings.projection if hasattr(module, "patch_embeddings") else module.patch_embedding
    return conv.weight[0].numel()


def pixels(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["llava", "paligemma", "blip_2", "vit"])
@pytest.mark.parametrize("size", [(56, 56), (70, 42), (63, 57)], ids=["same", "non-square", "ragged"])
def test_interpolated_position_embedding(request, name, size, embed_spy):
    """interpolate_pos_encoding=True: the table comes from the module's own method; the
    op adds it (per-image-size tables, H and W floor-divided by the patch)."""
    tiny = request.getfixturevalue(name)
    module = embeddings(tiny)
    x = pixels((2, 3, *size))
    with torch.no_grad():
        want = module(x, interpolate_pos_encoding=True)
        with patched(tiny.model):
            got = module(x, interpolate_pos_encoding=True)
    assert embed_spy.calls == 1
    assert got.shape == want.shape
    assert_close(got, want, reduction_length=reduction_length(module))


@pytest.mark.parametrize("name", ["llava", "paligemma"])
def test_bf16(request, name, embed_spy):
    tiny = request.getfixturevalue(name)
    module = copy.deepcopy(embeddings(tiny)).to(torch.bfloat16)
    x = pixels((2, 3, 56, 56))  # float32 pixels: converted to the weight dtype, as HF does
    with torch.no_grad():
        want = module(x)
        with patched(module) as report:
            assert [r.module_path for r in report.replaced] == [""]
            got = module(x)
    assert embed_spy.calls == 1
    assert got.dtype == want.dtype == torch.bfloat16
    # Both round the fp32-accumulated result to bf16 once; the sums' order differs.
    assert_close(got, want, dtype=torch.bfloat16)


@pytest.mark.parametrize("name", ["llava", "paligemma", "qwen2_vl"])
def test_no_host_sync(request, name, embed_spy):
    tiny = request.getfixturevalue(name)
    module = embeddings(tiny)
    x = pixels((7, module.proj.weight[0].numel())) if name == "qwen2_vl" else pixels((2, 3, 56, 56))
    with torch.no_grad(), patched(tiny.model):
        with HostSyncCounter() as syncs:
            module(x)
    assert embed_spy.calls == 1
    assert syncs.count == 0, syncs


def test_wrong_image_size_runs_the_original(llava, embed_spy):
    module = embeddings(llava)
    with torch.no_grad(), patched(llava.model):
        with pytest.raises(ValueError, match="doesn't match model"):
            module(pixels((1, 3, 70, 70)))
    assert embed_spy.calls == 0


def test_training_runs_the_op_with_the_same_gradients(llava, embed_spy):
    """The op is differentiable: gradients of the projection, class and position tables
    match the original module's."""
    module = embeddings(llava)
    x = pixels((2, 3, 56, 56))

    def run():
        llava.model.zero_grad(set_to_none=True)
        out = module(x)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}

    want, want_grads = run()
    with patched(llava.model):
        got, grads = run()
    llava.model.zero_grad(set_to_none=True)
    assert embed_spy.calls == 1
    assert_close(got, want.double(), dtype=torch.float32)
    assert grads.keys() == want_grads.keys() and "patch_embedding.weight" in grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_hooked_projection_runs_the_original(llava, embed_spy):
    module = embeddings(llava)
    x = pixels((1, 3, 56, 56))
    seen = []
    with torch.no_grad(), patched(llava.model):
        handle = module.patch_embedding.register_forward_hook(lambda *args: seen.append(1))
        try:
            module(x)
        finally:
            handle.remove()
        assert seen == [1] and embed_spy.calls == 0
        module(x)
    assert embed_spy.calls == 1


def test_positional_and_keyword_calls(llava, embed_spy):
    module = embeddings(llava)
    x = pixels((1, 3, 56, 56))
    with torch.no_grad():
        want = module(x)
        with patched(llava.model):
            results = [module(x), module(pixel_values=x), module(x, False), module(x, interpolate_pos_encoding=False)]
    assert embed_spy.calls == 4
    for got in results:
        assert_close(got, want, reduction_length=module.patch_embedding.weight[0].numel())


def test_blip_2_smaller_image_adds_the_table_prefix(blip_2, embed_spy):
    """BLIP-2 checks no image size: it adds the position table's first rows (a smaller
    image takes a prefix), and a larger image fails in the original's broadcast."""
    module = embeddings(blip_2)
    x = pixels((2, 3, 42, 28))  # 3x2 patches + class row: 7 of the 17 rows
    with torch.no_grad():
        want = module(x)
        with patched(blip_2.model):
            got = module(x)
            assert embed_spy.calls == 1
            with pytest.raises(RuntimeError):
                module(pixels((1, 3, 70, 70)))
    assert embed_spy.calls == 1
    assert got.shape == want.shape == (2, 7, module.embed_dim)
    assert_close(got, want, reduction_length=module.patch_embedding.weight[0].numel())


def test_vit_cases_the_op_does_not_cover_run_the_original(vit, embed_spy):
    """ViT: mask tokens (bool_masked_pos), a wrong image size and an active dropout run
    the original; bool_masked_pos=None (what ViTModel passes) runs the op."""
    encoder = copy.deepcopy(vit.model.encoder)  # a ViTModel: the embeddings' governing config
    module = encoder.embeddings
    module.mask_token = torch.nn.Parameter(torch.randn(1, 1, module.cls_token.shape[-1]))  # use_mask_token=True
    x = pixels((2, 3, 56, 56))
    masked = torch.zeros(2, 16, dtype=torch.bool)
    masked[:, ::3] = True
    with torch.no_grad():
        want, want_masked = module(x), module(x, bool_masked_pos=masked)
        with patched(encoder):
            got = module(x, bool_masked_pos=None)
            assert embed_spy.calls == 1
            assert torch.equal(module(x, bool_masked_pos=masked), want_masked)
            with pytest.raises(ValueError, match="doesn't match model"):
                module(pixels((1, 3, 70, 70)))
            module.dropout.p = 0.5
            module.train()
            torch.manual_seed(0)
            dropped = module(x)
            torch.manual_seed(0)
            assert torch.equal(dropped, module.dropout(want))
            assert embed_spy.calls == 1
    assert_close(got, want, reduction_length=reduction_length(module))


@pytest.mark.parametrize("size", [(56, 56), (70, 42), (63, 57)], ids=["same", "non-square", "ragged"])
def test_internvl_always_takes_its_interpolated_table(size, embed_spy):
    """InternViT takes no interpolate_pos_encoding flag: its forward always adds what its
    interpolate_pos_encoding returns (the stored table for the 56x56 grid, else bicubic);
    the op adds the same. Mask tokens and a tower without absolute positions run the
    original."""
    tiny = zoo.build("internvl", batch=1)
    model = tiny.model.model.vision_tower
    module = model.embeddings
    module.mask_token = torch.nn.Parameter(torch.randn(1, 1, module.cls_token.shape[-1]))  # use_mask_token=True
    with torch.no_grad():  # transformers initialises both to zeros: an interpolated zero table shows nothing
        module.position_embeddings.normal_(generator=torch.Generator().manual_seed(3))
        module.cls_token.normal_(generator=torch.Generator().manual_seed(4))
    x = pixels((2, 3, *size))
    masked = torch.zeros(2, (size[0] // 14) * (size[1] // 14), dtype=torch.bool)
    masked[:, ::3] = True
    with torch.no_grad():
        want, want_masked = module(x), module(x, bool_masked_pos=masked)
        with patched(model):
            got = module(x)
            assert embed_spy.calls == 1
            assert torch.equal(module(x, bool_masked_pos=masked), want_masked)
            table = module.position_embeddings
            module.position_embeddings = None  # use_absolute_position_embeddings=False
            without = module(x)
            module.position_embeddings = table
            assert embed_spy.calls == 1
    assert got.shape == want.shape == (2, 1 + masked.shape[1], module.cls_token.shape[-1])
    assert_close(got, want, reduction_length=reduction_length(module))
    assert not torch.equal(without, want)


def test_a_patched_projection_is_not_applicable(paligemma):
    """A rule checks the projection before patching: here a strided conv with overlap."""
    module = copy.deepcopy(embeddings(paligemma))
    module.patch_embedding.stride = (7, 7)
    report = patch(module, kernels=[KERNEL])
    assert report.replaced == []
    (skip,) = report.skipped
    assert "stride (7, 7) != kernel (14, 14)" in skip.reason
    assert ORIGINALS_ATTR not in module.__dict__


@pytest.fixture(scope="module")
def qwen2_vl():
    return zoo.build("qwen2_vl", batch=1)


def test_qwen2_vl_patch_embed_shapes(qwen2_vl, embed_spy):
    """Pre-flattened (N, C*T*P*P) patches run the op; any other shape the original."""
    module = embeddings(qwen2_vl)
    k = module.proj.weight[0].numel()
    flat = pixels((7, k))
    with torch.no_grad():
        want = module(flat)
        with patched(qwen2_vl.model):
            got = module(flat)
            assert embed_spy.calls == 1
            assert got.shape == want.shape == (7, module.embed_dim)
            assert_close(got, want, reduction_length=k)
            shaped = flat.view(7, module.in_channels, module.temporal_patch_size, module.patch_size, -1)
            assert torch.equal(module(shaped), want)  # 5-D input: the original's view
            assert embed_spy.calls == 1
            empty = module(pixels((0, k)))
            assert empty.shape == (0, module.embed_dim)


def test_config_less_modules_match_only_under_their_tower(qwen2_vl):
    """Qwen2-VL's PatchEmbed has no config: it is matched under its vision tower's
    model_type, never by its (generic) class name alone."""
    tower = qwen2_vl.model.model.visual
    assert tower.config.model_type == "qwen2_vl_vision"
    with patched(tower) as report:
        assert [(r.module_path, r.class_name) for r in report.replaced] == [("patch_embed", "PatchEmbed")]
    alone = copy.deepcopy(tower.patch_embed)
    report = patch(alone, kernels=[KERNEL])
    assert report.replaced == [] and [s.code for s in report.skipped] == ["no_match"]
    assert "qwen2_vl_vision" in str(report)
    assert ORIGINALS_ATTR not in alone.__dict__


def test_coverage_table_lists_the_rules():
    table = mmkernels.supported_models()
    for row in (
        "| CLIP vision | clip_vision_model | CLIPVisionEmbeddings | forward | patch_embed |",
        "| SigLIP vision | siglip_vision_model | SiglipVisionEmbeddings | forward | patch_embed |",
        "| BLIP-2 vision | blip_2_vision_model | Blip2VisionEmbeddings | forward | patch_embed |",
        "| ViT | vit | ViTEmbeddings | forward | patch_embed |",
        "| Qwen2-VL vision | qwen2_vl_vision | PatchEmbed | forward | patch_embed |",
        "| Qwen2.5-VL vision | qwen2_5_vl_vision | Qwen2_5_VisionPatchEmbed | forward | patch_embed |",
    ):
        assert row in table


# --------------------------------------------------------------------------------------
# Position tables: the weight's rows read in place, interpolated tables made once per size


def _tables(module):
    return module.__dict__["forward"].__func__.position_tables


def original_forward(module):
    from mmkernels.integrations.engine import original_method

    return original_method(module, "forward")


class TableSpy:
    """Records the ``position_embedding`` each ``mmkernels.ops.patch_embed`` call gets."""

    def __init__(self, monkeypatch):
        self.tables = []
        self._op = mmkernels.ops.patch_embed
        monkeypatch.setattr(mmkernels.ops, "patch_embed", self)

    def __call__(self, *args, **kwargs):
        self.tables.append(kwargs.get("position_embedding"))
        return self._op(*args, **kwargs)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_position_table_is_the_weight_and_follows_every_update(llava, mode, monkeypatch):
    """CLIP's position_embedding(position_ids) with arange ids: the op gets the weight's
    rows (no gather, nothing kept), so every update shows, one through ``.data`` included
    (it bypasses the version counter: a kept table was stale, 0.068 off in issue 15)."""
    module = copy.deepcopy(embeddings(llava))
    weight = module.position_embedding.weight
    x = pixels((2, 3, 56, 56))
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    spy = TableSpy(monkeypatch)
    with patched(module):
        tables = _tables(module)
        for update in (None, lambda: weight.add_(0.5), lambda: weight.data.mul_(2)):
            if update is not None:
                with torch.no_grad():
                    update()
            with context():
                got, want = module(x), original_forward(module)(x)
            assert_close(got, want, reduction_length=reduction_length(module))
            table = spy.tables[-1]
            assert table.data_ptr() == weight.data_ptr() and table.shape == weight.shape  # a view, not a copy
        assert tables.made == 0
    assert "forward" not in module.__dict__  # unpatch takes the tables with the forward


def test_position_ids_that_are_not_arange_are_looked_up_every_call(llava):
    module = copy.deepcopy(embeddings(llava))
    module.position_ids = module.position_ids.flip(-1).contiguous()  # the same buffer slot, reversed
    x = pixels((1, 3, 56, 56))
    with torch.no_grad(), patched(module) as report:
        (replaced,) = report.replaced
        assert any("position_embedding(position_ids) looked up every call" in note for note in replaced.notes)
        assert_close(module(x), original_forward(module)(x), reduction_length=reduction_length(module))
        module.position_ids.copy_(torch.arange(module.position_ids.shape[-1]))  # arange again (version moves)
        assert_close(module(x), original_forward(module)(x), reduction_length=reduction_length(module))
        module.position_ids[0, :2] = torch.tensor([1, 0])
        assert_close(module(x), original_forward(module)(x), reduction_length=reduction_length(module))
        assert _tables(module).made == 0


@pytest.mark.parametrize("name", ["llava", "vit"])
def test_interpolated_tables_are_made_once_per_size(request, name):
    tiny = request.getfixturevalue(name)
    module = embeddings(tiny)
    sizes = [(56, 56), (70, 42), (56, 56), (70, 42), (63, 57)]
    with torch.no_grad(), patched(tiny.model):
        tables = _tables(module)
        for size in sizes:
            x = pixels((2, 3, *size))
            got = module(x, interpolate_pos_encoding=True)
            assert_close(got, original_forward(module)(x, interpolate_pos_encoding=True),
                         reduction_length=reduction_length(module))  # fmt: skip
        assert tables.made == 3  # one table per size
        tables.MAX_TABLES = 1  # a new size now keeps only itself
        module(pixels((2, 3, 42, 70)), interpolate_pos_encoding=True)
        module(pixels((2, 3, 56, 56)), interpolate_pos_encoding=True)
        assert tables.made == 5


def test_clear_caches_drops_interpolated_tables_after_a_write_through_data(llava):
    """``.data`` writes bypass the version counter the interpolated tables are keyed by
    (documented); ``mmkernels.integrations.clear_caches`` drops them."""
    module = copy.deepcopy(embeddings(llava))
    x = pixels((2, 3, 70, 42))
    with torch.no_grad(), patched(module) as report:
        (replaced,) = report.replaced
        assert any("see mmkernels.integrations.clear_caches" in note for note in replaced.notes)
        module(x, interpolate_pos_encoding=True)
        assert _tables(module).made == 1
        module.position_embedding.weight.data.mul_(2)
        assert integrations.clear_caches(module) >= 1
        got = module(x, interpolate_pos_encoding=True)
        assert _tables(module).made == 2
        assert_close(got, original_forward(module)(x, interpolate_pos_encoding=True),
                     reduction_length=reduction_length(module))  # fmt: skip
    assert integrations.clear_caches(module) == 0  # unpatched: nothing kept
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        integrations.clear_caches("model")


def test_position_tables_are_not_kept_when_autograd_records_or_hooks_run(llava):
    module = copy.deepcopy(embeddings(llava))
    x = pixels((1, 3, 56, 56))
    with patched(module):
        tables = _tables(module)
        out = module(x, interpolate_pos_encoding=True)  # grad enabled, trainable table: its graph is needed
        out.sum().backward()
        assert tables.made == 0 and module.position_embedding.weight.grad is not None
        seen = []
        handle = module.position_embedding.register_forward_hook(lambda *args: seen.append(1))
        try:
            with torch.no_grad():
                got = module(x)  # a hooked lookup runs (and its hooks) every call
                module(x)
        finally:
            handle.remove()
        assert seen == [1, 1] and tables.made == 0
        with torch.no_grad():
            assert_close(got, original_forward(module)(x), reduction_length=reduction_length(module))
            module(x, interpolate_pos_encoding=True)
        assert tables.made == 1
    with torch.inference_mode():  # weights made here are inference tensors: no version counter
        frozen = copy.deepcopy(embeddings(llava))
        frozen.position_embedding.weight = torch.nn.Parameter(frozen.position_embedding.weight.clone(), False)
        with patched(frozen):
            want = original_forward(frozen)(x)
            assert_close(frozen(x), want, reduction_length=reduction_length(frozen))
            frozen(x, interpolate_pos_encoding=True)
            frozen(x, interpolate_pos_encoding=True)
            assert _tables(frozen).made == 0


# --------------------------------------------------------------------------------------
# Threads


def test_position_tables_are_thread_safe():
    """Issue 15: from 8 threads the LRU raised KeyError (another thread dropped the key
    between the lookup and ``move_to_end``; once in 160k calls there). Here every lookup
    gives the other threads a turn (``sleep(0)`` releases the GIL), and 3 sizes with 2
    kept make nearly every call add or drop one: without the lock the race showed in
    every run."""
    import collections
    import threading
    import time

    from mmkernels.integrations.hf_patch_embed import PositionTables

    class Yielding(collections.OrderedDict):
        def get(self, *args):
            value = super().get(*args)
            time.sleep(0)
            return value

    tables, sources, errors = PositionTables(), (torch.zeros(3),), []
    tables._tables, tables.MAX_TABLES = Yielding(), 2

    def work(seed):
        try:
            for i in range(500):
                size = (seed + i) % 3
                assert tables.get(sources, (size,), lambda: size) == size
        except Exception as error:  # noqa: BLE001 (reported below)
            errors.append(repr(error))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(tables._tables) == 2


def test_patched_embeddings_from_eight_threads_equal_one_thread(llava):
    """8 threads over 4 image sizes (interpolated tables, 2 kept: made and dropped
    concurrently) and the native size: every output equals the single-threaded one."""
    import threading

    module = copy.deepcopy(embeddings(llava))
    sizes = [(56, 56), (70, 42), (42, 70), (63, 57)]
    inputs = [(pixels((2, 3, *size), seed=i), size != (56, 56)) for i, size in enumerate(sizes)]
    with torch.no_grad(), patched(module):
        _tables(module).MAX_TABLES = 2
        want = [module(x, interpolate_pos_encoding=flag) for x, flag in inputs]
        got, errors = {}, []

        def work(k):
            try:
                with torch.no_grad():
                    for i in range(3):
                        j = (k + i) % len(inputs)
                        got[k, i] = (j, module(inputs[j][0], interpolate_pos_encoding=inputs[j][1]))
            except Exception as error:  # noqa: BLE001 (reported below)
                errors.append(repr(error))

        threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == [] and len(got) == 24
    for j, out in got.values():
        assert torch.equal(out, want[j])


# --------------------------------------------------------------------------------------
# Llama 4's unfold + linear patch embedding


@pytest.mark.parametrize("size", [(56, 56), (70, 42), (63, 57)], ids=["same", "non-square", "ragged"])
def test_unfold_linear_patch_matches_the_module_on_odd_inputs(size):
    """Ragged sizes (the unfold drops the partial patches, the op too) and strided pixels;
    a raw-pixel patch normalizes in the kernel as the conv rules do."""
    tiny = build_or_skip("llama4", batch=1)
    module = tiny.model.vision_model.patch_embedding
    generator = torch.Generator().manual_seed(0)
    strided = torch.randn(2, 3, 2 * size[0], size[1], generator=generator)[:, :, ::2]
    with torch.no_grad():
        want = module(strided)
        with patched(tiny.model) as report:
            assert [r.class_name for r in report.replaced] == ["Llama4UnfoldConvolution"]
            got = module(strided)
    assert got.shape == want.shape
    assert relative_error(got, want) <= 1e-5

    raw = torch.randint(0, 256, (1, 3, *size), generator=generator, dtype=torch.uint8)
    mean, std, scale = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 1 / 255
    normalized = (raw.float() * scale - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        want = module(normalized)
        with patched(tiny.model, pixel_normalization=dict(mean=mean, std=std, scale=scale)):
            got = module(raw)
    assert relative_error(got, want) <= 1e-5


def test_unfold_linear_patch_refuses_an_overlapping_unfold():
    tiny = build_or_skip("llama4", batch=1)
    module = tiny.model.vision_model.patch_embedding
    module.unfold = torch.nn.Unfold(kernel_size=14, stride=7)
    with patched(tiny.model) as report:
        assert report.replaced == []
        assert any("not square patches without overlap" in s.reason for s in report.skipped), str(report)


# --------------------------------------------------------------------------------------
# Towers whose embeddings are copies of a covered class (the same source under other names)


@dataclasses.dataclass(frozen=True)
class CopyTower:
    """A vision tower built tiny from its real config class: ``model`` in
    ``transformers.models.<package>``, its embeddings at ``embeddings``, covered by the
    ``PATCH_EMBED_SPECS`` row of ``family``; ``flag``: its forward takes
    ``interpolate_pos_encoding`` (CLIP's and BLIP-2's copies), ``always_interpolates``: it takes
    any size (InternViT's copy); ``extra``: config fields beyond the common small sizes."""

    package: str
    config: str
    model: str
    embeddings: str
    family: str
    flag: bool = False
    always_interpolates: bool = False
    extra: tuple = ()


SMALL_TOWER = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, image_size=56,
                   patch_size=7)  # fmt: skip
COPY_TOWERS = {
    "git": CopyTower("git", "GitVisionConfig", "GitVisionModel", "vision_model.embeddings", "GIT vision", flag=True),
    "kosmos2": CopyTower("kosmos2", "Kosmos2VisionConfig", "Kosmos2VisionModel", "model.embeddings", "Kosmos-2 vision",
                         flag=True),  # fmt: skip
    "granite_docling": CopyTower("granite_docling", "GraniteDoclingVisionConfig", "GraniteDoclingVisionModel",
                                 "embeddings", "Granite Docling vision",
                                 extra=(("deepstack_visual_indexes", [0, 1]), ("out_hidden_size", 64))),  # fmt: skip
    # BLIP-2's initializer_range (1e-10) leaves the conv ~0 next to the tables: 0.02 makes it count.
    "instructblip": CopyTower("instructblip", "InstructBlipVisionConfig", "InstructBlipVisionModel", "embeddings",
                              "InstructBLIP vision", flag=True, extra=(("initializer_range", 0.02),)),  # fmt: skip
    "instructblipvideo": CopyTower("instructblipvideo", "InstructBlipVideoVisionConfig", "InstructBlipVideoVisionModel",
                                   "embeddings", "InstructBLIP-Video vision", flag=True,
                                   extra=(("initializer_range", 0.02),)),  # fmt: skip
    "qianfan_ocr": CopyTower("qianfan_ocr", "QianfanOCRVisionConfig", "QianfanOCRVisionModel", "embeddings",
                             "Qianfan-OCR vision", always_interpolates=True),  # fmt: skip
}


def copy_tower(tower: CopyTower) -> torch.nn.Module:
    """The tower in eval mode; a family this transformers lacks skips by name."""
    found = []
    for kind, name in (("configuration", tower.config), ("modeling", tower.model)):
        reason = f"transformers {transformers.__version__} has no {tower.package}"
        module = pytest.importorskip(f"transformers.models.{tower.package}.{kind}_{tower.package}", reason=reason)
        found.append(getattr(module, name))
    config_class, model_class = found
    model = model_class(config_class(**SMALL_TOWER, **dict(tower.extra))).eval()
    with torch.no_grad():  # tables some towers initialise to zeros (InternViT's): a zero table hides a wrong add
        generator = torch.Generator().manual_seed(5)
        for parameter in model.get_submodule(tower.embeddings).parameters():
            if not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model


def tower_outputs(model, x, **kwargs) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(pixel_values=x, **kwargs)
    fields = (out.get("last_hidden_state"), out.get("pooler_output"))
    return [value for value in fields if isinstance(value, torch.Tensor)]


@pytest.mark.parametrize("name", list(COPY_TOWERS))
def test_copied_embeddings_patch_like_their_source(name, embed_spy):
    """Patched vs unpatched tower outputs within fp32 rounding at the configured size, and at
    another size where the tower interpolates (the flag, or always); the op runs once per
    forward; the report names the embeddings under the copy's own row; ``state_dict``
    unchanged; ``unpatch`` restores every instance ``__dict__`` and the outputs exactly."""
    tower = COPY_TOWERS[name]
    model = copy_tower(tower)
    module = model.get_submodule(tower.embeddings)
    from mmkernels.integrations.hf_patch_embed import PATCH_EMBED_SPECS

    spec = next(spec for spec in PATCH_EMBED_SPECS if spec.family == tower.family)
    assert type(module).__name__ == spec.model_class
    calls = [(pixels((2, 3, 56, 56)), {})]
    if tower.flag:
        calls.append((pixels((2, 3, 70, 42), seed=2), dict(interpolate_pos_encoding=True)))
    if tower.always_interpolates:
        calls.append((pixels((2, 3, 70, 42), seed=2), {}))
    before = instance_dicts(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    want = [tower_outputs(model, x, **kwargs) for x, kwargs in calls]
    with patched(model) as report:
        assert [(r.module_path, r.class_name, r.family) for r in report.replaced] == [
            (tower.embeddings, spec.model_class, tower.family)]
        got = [tower_outputs(model, x, **kwargs) for x, kwargs in calls]
        assert embed_spy.calls == len(calls)
        assert model.state_dict().keys() == state.keys()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    for got_outputs, want_outputs in zip(got, want):
        assert len(got_outputs) == len(want_outputs)
        for g, w in zip(got_outputs, want_outputs):
            assert g.shape == w.shape
            assert relative_error(g, w) <= RTOL
    assert_same_instance_dicts(instance_dicts(model), before)
    for (x, kwargs), want_outputs in zip(calls, want):
        for g, w in zip(tower_outputs(model, x, **kwargs), want_outputs):
            assert torch.equal(g, w)
    assert embed_spy.calls == len(calls)
