"""The bare patch-conv rule on live Hugging Face vision towers whose positions are added
in the tower's own forward: Pixtral (rotary positions later), Mllama (gated tile and
position embeddings inline), the NaViT-style towers that bucket positions from a patch mask
(Idefics2, Idefics3, SmolVLM, Phi-4-multimodal) or from target sizes (MiniCPM-V 4.6 / 4.7,
MiniCPM-OCR), Ovis2 (an RMSNorm before the positions), and the towers fed patches already
cut to ``(L, C, P, P)`` (Kimi K2.5, Ovis2.5, PaddleOCR-VL, LLaVA-OneVision-1.5, VideoLLaMA3,
GLM-Image, dots3-note, HunYuan-VL, HY-V4-VL). Then the towers whose specs name the conv's
path because other convs in them pass the conv checks too: the SAM-style encoders (GOT-OCR2,
PP-FormulaNet, the SAM towers of DeepSeek-OCR2, Unlimited-OCR and DeepSeek-VL-hybrid: a 1x1
neck conv) and HunYuan-VL / HY-V4-VL (a stride == kernel patch merger and a 1x1 conv after
it); those convs are neither replaced nor reported. Tiny random-init towers built from their
real config classes; a family this transformers lacks (those newer than 5.17, the lowest
lane) is skipped by name.

Patched vs unpatched: fp32 outputs within 1e-5 relative (the GEMM sums in another order),
the report names the conv and its spec, the op runs once per forward, ``state_dict``
unchanged, ``unpatch`` exact, raw uint8 pixels normalized in the kernel equal
host-normalized pixels, and the calls the op does not cover (a dtype mix, hooks, other
strides) run the original ``Conv2d.forward``.
"""

import dataclasses  # noqa: E402
from typing import Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

import mmkernels  # noqa: E402
import mmkernels.ops  # noqa: E402
from mmkernels.backend import Backend, decision_mark, decisions_since  # noqa: E402
from mmkernels.integrations.engine import ORIGINALS_ATTR, PatchOptions, patch_model, unpatch_model  # noqa: E402
from mmkernels.integrations.hf_patch_embed import (CONV_PATCH_SPECS, IMAGE_FORM, ConvPatchRule,  # noqa: E402
                                                   ConvPatchSpec, _conv_reasons)  # fmt: skip
from mmkernels.testing import relative_error  # noqa: E402

RTOL = 1e-5
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2)
PATCH = 7
GRID_THW = ((1, 4, 6), (1, 2, 2))  # two images of 4 x 6 and 2 x 2 patches: 28 patch rows


def classes(family: str, *names: str) -> list:
    """``names`` from ``transformers.models.<family>`` (its configuration and modeling
    modules); the test skips, naming the family, where this transformers has no such model."""
    found = []
    for name in names:
        kind = "configuration" if name.endswith("Config") else "modeling"
        module = pytest.importorskip(f"transformers.models.{family}.{kind}_{family}",
                                     reason=f"transformers {transformers.__version__} has no {family}")  # fmt: skip
        found.append(getattr(module, name))
    return found


@dataclasses.dataclass(frozen=True)
class Tower:
    """``build()`` -> the tower in eval mode; ``inputs(raw)`` -> uint8 pixels ``(..., 3, H, W)``
    (random when ``raw`` is None) and the forward's other arguments; ``conv``: the conv's module
    path; ``model_type``: the ``CONV_PATCH_SPECS`` entry that must match it; ``flat``: the tower
    takes each ``(3, P, P)`` patch as one row of ``3 * P * P`` values; ``float_pixels``: its
    model casts the pixels to its dtype before the tower, whose forward reads their dtype
    (transformers 5.17's Idefics buckets positions in it), so raw pixels come as 0..255 floats.
    ``others``: convs beside the patch conv that the conv checks alone accept (a 1x1 neck conv,
    a patch merger's): only the spec's ``conv`` path keeps them out. ``outputs``: the output
    fields compared (a merger's or projector's result is the ``pooler_output``)."""

    build: Callable[[], torch.nn.Module]
    inputs: Callable[..., tuple[torch.Tensor, dict]]
    conv: str
    model_type: str
    flat: bool = False
    float_pixels: bool = False
    others: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ("last_hidden_state",)


def pixtral_tower():
    from transformers import PixtralVisionConfig, PixtralVisionModel

    config = PixtralVisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                                 head_dim=32, image_size=56, patch_size=7)  # fmt: skip
    return PixtralVisionModel(config).eval()


def mllama_tower():
    from transformers import MllamaVisionConfig
    from transformers.models.mllama.modeling_mllama import MllamaVisionModel

    config = MllamaVisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_global_layers=1,
                                attention_heads=2, vision_output_dim=128, image_size=28, patch_size=7, max_num_tiles=4,
                                intermediate_layers_indices=[0], supported_aspect_ratios=[[1, 1], [1, 2], [2, 1], [2, 2]])  # fmt: skip
    return MllamaVisionModel(config).eval()


def pixtral_inputs(raw=None):
    raw = torch.randint(0, 256, (2, 3, 56, 49), dtype=torch.uint8) if raw is None else raw
    return raw, dict(image_sizes=torch.tensor([[56, 49], [42, 35]]))


def mllama_inputs(raw=None):
    raw = torch.randint(0, 256, (1, 2, 4, 3, 28, 28), dtype=torch.uint8) if raw is None else raw
    return raw, dict(aspect_ratio_ids=torch.tensor([[4, 2]]), aspect_ratio_mask=torch.tensor([[[1, 1, 1, 1], [1, 1, 0, 0]]]))


def masked_tower(family: str, prefix: str, model_name: str, model_type: str, linear_std: float | None = None):
    """Idefics2 / Idefics3 / SmolVLM / Phi-4-multimodal: (B, 3, H, W) pixels and a
    ``patch_attention_mask`` (the second image is a 5 x 4 patch crop padded to 8 x 7).
    ``linear_std``: redraw every Linear weight with this std after the model's own init."""

    def build():
        config, model = classes(family, f"{prefix}VisionConfig", model_name)
        model = model(config(**SMALL, image_size=56, patch_size=PATCH)).eval()
        if linear_std is not None:
            with torch.no_grad():
                for module in model.modules():
                    if isinstance(module, torch.nn.Linear):
                        module.weight.normal_(std=linear_std)
        return model

    def inputs(raw=None):
        raw = torch.randint(0, 256, (2, 3, 56, 49), dtype=torch.uint8) if raw is None else raw
        mask = torch.zeros(2, 8, 7, dtype=torch.bool)
        mask[0], mask[1, :5, :4] = True, True
        return raw, dict(patch_attention_mask=mask)

    return Tower(build, inputs, "embeddings.patch_embedding", model_type, float_pixels=True)


def minicpm_tower(family: str, prefix: str, model_type: str):
    """MiniCPM-V: one image's 4 x 6 patches laid in one row, ``(1, 3, P, 24 * P)``, with its
    ``target_sizes``; ``insert_layer_id=0`` runs the window merger after the first layer. (One
    image: transformers 5.17 merges per batch row, 5.25 packs the images in one row.)"""

    def build():
        config, model = classes(family, f"{prefix}VisionConfig", f"{prefix}VisionModel")
        return model(config(**SMALL, image_size=56, patch_size=PATCH, insert_layer_id=0)).eval()

    def inputs(raw=None):
        raw = torch.randint(0, 256, (1, 3, PATCH, 24 * PATCH), dtype=torch.uint8) if raw is None else raw
        return raw, dict(target_sizes=torch.tensor([[4, 6]]))

    return Tower(build, inputs, "embeddings.patch_embedding", model_type)


def patch_rows(leading=()):
    """Inputs of the towers fed patches already cut: 28 uint8 ``(3, P, P)`` patches (after
    ``leading`` dims) and ``grid_thw``."""

    def inputs(raw=None):
        raw = torch.randint(0, 256, (*leading, 28, 3, PATCH, PATCH), dtype=torch.uint8) if raw is None else raw
        return raw, dict(grid_thw=torch.tensor(GRID_THW))

    return inputs


def kimi_tower():
    config, model = classes("kimi_k25", "Kimi_K25VisionConfig", "Kimi_K25VisionModel")
    return model(config(**SMALL, patch_size=PATCH, pos_emb_height=8, pos_emb_width=8)).eval()


def ovis2_tower():
    config, model = classes("ovis2", "Ovis2VisionConfig", "Ovis2VisionModel")
    if config.model_type != "ovis2_vision":
        pytest.skip(f"transformers {transformers.__version__}: Ovis2VisionConfig has no model_type of its own "
                    f"({config.model_type!r}); the tower falls under its parent's 'ovis2'")  # fmt: skip
    return model(config(**SMALL, image_size=56, patch_size=PATCH, vocab_size=32)).eval()


def ovis2_inputs(raw=None):
    return (torch.randint(0, 256, (2, 3, 56, 56), dtype=torch.uint8) if raw is None else raw), {}


def ovis2_5_tower():
    config, model = classes("ovis2_5", "Ovis2_5VisionConfig", "Ovis2_5VisionModel")
    return model(config(**SMALL, image_size=56, patch_size=PATCH, vocab_size=32, window_size=28)).eval()


def paddleocr_tower():
    config, model = classes("paddleocr_vl", "PaddleOCRVisionConfig", "PaddleOCRVisionModel")
    return model(config(**SMALL, image_size=56, patch_size=PATCH)).eval()


def llava_ov_1_5_tower():
    config, model = classes("llava_onevision1_5", "LlavaOnevision15VisionConfig", "LlavaOnevision15VisionModel")
    return model(config(hidden_size=64, intermediate_size=96, depth=2, num_heads=2, patch_size=PATCH,
                        out_hidden_size=64)).eval()  # fmt: skip


def video_llama_3_tower():
    config, model = classes("video_llama_3", "VideoLlama3VisionConfig", "VideoLlama3VisionModel")
    return model(config(**SMALL, patch_size=PATCH)).eval()


def video_llama_3_inputs(raw=None):
    raw, extra = patch_rows()(raw)
    return raw, dict(extra, merge_sizes=torch.tensor([2, 2]))


def glm_image_tower():
    config, model = classes("glm_image", "GlmImageVisionConfig", "GlmImageVisionModel")
    return model(config(hidden_size=64, intermediate_size=96, depth=2, num_heads=2, patch_size=PATCH,
                        image_size=56)).eval()  # fmt: skip


def dots3_tower():
    config, model = classes("dots3_note", "Dots3NoteVisionConfig", "Dots3NoteVisionModel")
    return model(config(**SMALL, patch_size=PATCH, mlp_layer_types=["dense", "dense"], adapter_in_dim=64,
                        adapter_out_dim=64)).eval()  # fmt: skip


def own_model_type(config, model_type: str):
    """``config`` (a config class) when its ``model_type`` is ``model_type``; else the test
    skips: before transformers 5.20 GOT-OCR2's and PP-FormulaNet's vision configs have none of
    their own and the tower falls under its parent's."""
    if config.model_type != model_type:
        pytest.skip(f"transformers {transformers.__version__}: {config.__name__} has no model_type of its own "
                    f"({config.model_type!r}), not {model_type!r}")  # fmt: skip
    return config


# SAM-style encoders: 8 x 8 patches of 7 pixels, windows of 4 patches in the first layer,
# global attention in the second; initializer_range 0.02 (SAM's 1e-10 makes every weight ~0).
SAM = dict(hidden_size=64, output_channels=32, num_hidden_layers=2, num_attention_heads=2, image_size=56,
           patch_size=PATCH, mlp_dim=96, window_size=4, global_attn_indexes=[1], initializer_range=0.02)  # fmt: skip


def sam_inputs(raw=None):
    return (torch.randint(0, 256, (2, 3, 56, 56), dtype=torch.uint8) if raw is None else raw), {}


def got_ocr2_tower():
    config, model = classes("got_ocr2", "GotOcr2VisionConfig", "GotOcr2VisionEncoder")
    return model(own_model_type(config, "got_ocr2_vision")(**SAM)).eval()


def deepseek_ocr2_sam_tower():
    config, model = classes("deepseek_ocr2", "DeepseekOcr2SamVisionConfig", "DeepseekOcr2SamVisionEncoder")
    return model(config(**SAM, downsample_channels=[48, 64])).eval()


def unlimited_ocr_sam_tower():
    config, model = classes("unlimited_ocr", "UnlimitedOcrSamVisionConfig", "UnlimitedOcrSamVisionEncoder")
    return model(config(**SAM, downsample_channels=[48, 64])).eval()


def pp_formulanet_tower():
    config, model = classes("pp_formulanet", "PPFormulaNetVisionConfig", "PPFormulaNetVisionModel")
    config = own_model_type(config, "pp_formulanet_vision")
    return model(config(**SAM, post_conv_in_channels=32, post_conv_mid_channels=48, post_conv_out_channels=64,
                        decoder_hidden_size=32)).eval()  # fmt: skip


def sam_tower():
    config, model = classes("sam", "SamVisionConfig", "SamVisionModel")
    return model(config(**SAM)).eval()


def hunyuan_tower(family: str, prefix: str, model_name: str, **extra):
    """HunYuan-VL / HY-V4-VL: flat patches with ``grid_thw``; the merger (2 x 2) needs both
    sides above 1, as both images have."""

    def build():
        config, model = classes(family, f"{prefix}VisionConfig", model_name)
        return model(config(**SMALL, patch_size=PATCH, max_image_size=56, spatial_merge_size=2, **extra)).eval()

    return build


MERGER = ("patch_merger.proj_conv", "patch_merger.proj_out")

TOWERS = {
    "pixtral": Tower(pixtral_tower, pixtral_inputs, "patch_conv", "pixtral"),
    "mllama": Tower(mllama_tower, mllama_inputs, "patch_embedding", "mllama_vision_model"),
    "idefics2": masked_tower("idefics2", "Idefics2", "Idefics2VisionTransformer", "idefics2_vision"),
    "idefics3": masked_tower("idefics3", "Idefics3", "Idefics3VisionTransformer", "idefics3_vision"),
    "smolvlm": masked_tower("smolvlm", "SmolVLM", "SmolVLMVisionTransformer", "smolvlm_vision"),
    # Phi-4's _init_weights draws its attention and MLP weights with std 1: the softmax
    # saturates and the tower amplifies the conv's fp32 rounding (2.4e-7) about 100-fold.
    # Checkpoints are not like that: std 0.02 (the others' initializer_range) instead.
    "phi4_multimodal": masked_tower("phi4_multimodal", "Phi4Multimodal", "Phi4MultimodalVisionModel",
                                    "phi4_multimodal_vision", linear_std=0.02),  # fmt: skip
    "minicpmv4_6": minicpm_tower("minicpmv4_6", "MiniCPMV4_6", "minicpmv4_6_vision"),
    "minicpmv4_7": minicpm_tower("minicpmv4_7", "MiniCPMV4_7", "minicpmv4_7_vision"),
    "minicpm_ocr": minicpm_tower("minicpm_ocr", "MiniCPMOcr", "minicpm_ocr_vision"),
    "ovis2": Tower(ovis2_tower, ovis2_inputs, "transformer.embeddings.patch_embedding", "ovis2_vision"),
    # Fed (L, 3, P, P) patches: the conv sees H == W == P, one output row per patch.
    "kimi_k25": Tower(kimi_tower, patch_rows(), "patch_embed.proj", "kimi_k25_vision"),
    "paddleocr_vl": Tower(paddleocr_tower, patch_rows(leading=(1,)), "vision_model.embeddings.patch_embedding",
                          "paddleocr_vl_vision"),  # fmt: skip
    # Fed (L, 3 * P * P) rows, which the tower views as (L, 3, P, P).
    "ovis2_5": Tower(ovis2_5_tower, patch_rows(), "embeddings.patch_embedding", "ovis2_5_vision", flat=True),
    "llava_onevision1_5": Tower(llava_ov_1_5_tower, patch_rows(), "patch_embed.proj", "llava_onevision1_5_vision",
                                flat=True),  # fmt: skip
    "video_llama_3": Tower(video_llama_3_tower, video_llama_3_inputs, "embeddings.patch_embedding",
                           "video_llama_3_vision", flat=True),  # fmt: skip
    "glm_image": Tower(glm_image_tower, patch_rows(), "patch_embed.proj", "glm_image_vision", flat=True),
    "dots3_note": Tower(dots3_tower, patch_rows(), "patch_embed.proj", "dots3_note_vision_encoder", flat=True),
    # Specs with a conv path: the 1x1 neck conv1 (and the merger's convs) pass the conv checks too.
    "got_ocr2": Tower(got_ocr2_tower, sam_inputs, "patch_embed.projection", "got_ocr2_vision",
                      others=("neck.conv1",)),  # fmt: skip
    "deepseek_ocr2_sam": Tower(deepseek_ocr2_sam_tower, sam_inputs, "patch_embed.projection",
                               "deepseek_ocr2_sam_vision_model", others=("neck.conv1",)),  # fmt: skip
    "unlimited_ocr_sam": Tower(unlimited_ocr_sam_tower, sam_inputs, "patch_embed.projection",
                               "unlimited_ocr_sam_vision_model", others=("neck.conv1",)),  # fmt: skip
    "pp_formulanet": Tower(pp_formulanet_tower, sam_inputs, "patch_embed.projection", "pp_formulanet_vision",
                           others=("neck.conv1",), outputs=("last_hidden_state", "pooler_output")),  # fmt: skip
    "sam": Tower(sam_tower, sam_inputs, "vision_encoder.patch_embed.projection", "sam_vision_model",
                 others=("vision_encoder.neck.conv1",)),  # fmt: skip
    "hunyuan_vl": Tower(hunyuan_tower("hunyuan_vl", "HunYuanVL", "HunYuanVLVisionTransformer", text_hidden_size=64),
                        patch_rows(), "embeddings.patch_embedding", "hunyuan_vl_vision", flat=True, others=MERGER,
                        outputs=("last_hidden_state", "pooler_output")),  # fmt: skip
    "hy_v4_vl": Tower(hunyuan_tower("hy_v4_vl", "HYV4VL", "HYV4VLVisionModel", out_hidden_size=64), patch_rows(),
                      "embeddings.patch_embedding", "hy_v4_vl_vision", flat=True, others=MERGER,
                      outputs=("last_hidden_state", "pooler_output")),  # fmt: skip
}


def normalized(raw: torch.Tensor) -> torch.Tensor:
    shape = [1] * raw.dim()
    shape[-3] = 3
    mean, std = torch.tensor(MEAN).view(shape), torch.tensor(STD).view(shape)
    return (raw.float() / 255 - mean) / std


def output(tower, model, pixels, extra) -> tuple[torch.Tensor, ...]:
    if tower.flat:
        pixels = pixels.flatten(-3)
    with torch.no_grad():
        out = model(pixel_values=pixels, **extra)
    return tuple(out[name] for name in tower.outputs)


def error(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> float:
    """The largest relative error over the compared outputs."""
    assert len(got) == len(want)
    return max(relative_error(g, w) for g, w in zip(got, want))


def conv_paths(model) -> list[str]:
    return [path for path, module in model.named_modules() if isinstance(module, torch.nn.Conv2d)]


@pytest.mark.parametrize("name", list(TOWERS))
def test_patched_conv_matches_and_unpatch_restores(name, monkeypatch):
    tower = TOWERS[name]
    model = tower.build()
    raw, extra = tower.inputs()
    pixels = normalized(raw)
    before = output(tower, model, pixels, extra)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = mmkernels.patch(model, kernels=["patch_embed"])
    assert [(r.module_path, r.class_name) for r in report.replaced] == [(tower.conv, "Conv2d")]
    family = next(spec.family for spec in CONV_PATCH_SPECS if spec.model_type == tower.model_type)
    assert report.replaced[0].family == family
    # The other convs: the conv checks alone accept those in `others`; none is replaced or reported.
    assert all(not _conv_reasons(model.get_submodule(path), IMAGE_FORM) for path in tower.others)
    others = [path for path in conv_paths(model) if path != tower.conv]
    assert set(tower.others) <= set(others)
    assert not [s for s in report.skipped if s.module_path in others]
    assert not [p for p in others if {"forward", ORIGINALS_ATTR} & model.get_submodule(p).__dict__.keys()]
    calls = []
    real = mmkernels.ops.patch_embed
    monkeypatch.setattr(mmkernels.ops, "patch_embed", lambda *a, **k: calls.append(1) or real(*a, **k))
    mark = decision_mark()
    after = output(tower, model, pixels, extra)
    assert len(calls) == 1
    ran = [d for d in decisions_since(mark) if d.op == "patch_embed"]
    assert ran and all(d.backend is Backend.INTERPRETER for d in ran)
    assert error(after, before) <= RTOL
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    mmkernels.unpatch(model)
    conv = model.get_submodule(tower.conv)
    assert "forward" not in conv.__dict__ and ORIGINALS_ATTR not in conv.__dict__
    torch.testing.assert_close(output(tower, model, pixels, extra), before, rtol=0, atol=0)
    assert len(calls) == 1


@pytest.mark.parametrize("name", list(TOWERS))
def test_raw_uint8_pixels_normalized_in_the_kernel(name):
    tower = TOWERS[name]
    model = tower.build()
    raw, extra = tower.inputs()
    expected = output(tower, model, normalized(raw), extra)
    mmkernels.patch(model, kernels=["patch_embed"], pixel_normalization=dict(mean=MEAN, std=STD))
    # The towers pass pixels to the conv as they come or cast to the weight dtype: 0..255 survive exactly.
    pixels = raw.float() if tower.float_pixels else raw
    assert error(output(tower, model, pixels, extra), expected) <= RTOL


def test_calls_the_op_does_not_cover_run_the_original(monkeypatch):
    model = pixtral_tower()
    mmkernels.patch(model, kernels=["patch_embed"])
    calls = []
    real = mmkernels.ops.patch_embed
    monkeypatch.setattr(mmkernels.ops, "patch_embed", lambda *a, **k: calls.append(1) or real(*a, **k))
    conv = model.patch_conv
    x = torch.randn(1, 3, 14, 14)
    want = torch.nn.functional.conv2d(x, conv.weight, conv.bias, stride=7)
    torch.testing.assert_close(conv(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv(input=x), want, rtol=1e-5, atol=1e-5)
    assert len(calls) == 2
    # A dtype mix: Conv2d raises its own error; the op must not hide it by casting.
    with pytest.raises(RuntimeError):
        conv(x.double())
    # Unbatched (C, H, W) input: the original handles it.
    torch.testing.assert_close(conv(x[0]), want[0], rtol=0, atol=0)
    # A hook added after patching: the original runs under it.
    seen = []
    handle = conv.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    torch.testing.assert_close(conv(x), want, rtol=0, atol=0)
    handle.remove()
    assert seen == [want.shape] and len(calls) == 2


def test_strided_conv_elsewhere_is_not_patched():
    model = pixtral_tower()
    model.patch_conv.stride = (3, 3)
    report = mmkernels.patch(model, kernels=["patch_embed"])
    assert not report.replaced
    assert any("stride (3, 3) != kernel (7, 7)" in s.reason for s in report.skipped)


def test_phi4_audio_convs_beside_the_vision_tower_are_left_alone():
    """Phi-4-multimodal's image and audio embeddings side by side: only the vision patch conv
    is replaced. The audio subsampling convs fall under ``phi4_multimodal_audio``, which no
    conv spec lists; two have padding and stride 2, but one is a 1x1 conv with stride 1 that
    the conv checks alone would accept."""
    (config_class,) = classes("phi4_multimodal", "Phi4MultimodalConfig")
    (embedding,) = classes("phi4_multimodal", "Phi4MultimodalFeatureEmbedding")
    config = config_class(
        hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        vision_config=dict(SMALL, image_size=56, patch_size=PATCH, crop_size=56),
        audio_config=dict(hidden_size=64, intermediate_size=96, num_blocks=1, num_attention_heads=2, input_size=16,
                          ext_pw_out_channel=64, depthwise_separable_out_channel=64, nemo_conv_channels=16,
                          time_reduction=4),
    )  # fmt: skip
    model = embedding(config).eval()
    audio = {path: m for path, m in model.audio_embed.named_modules(prefix="audio_embed")
             if isinstance(m, torch.nn.Conv2d)}  # fmt: skip
    assert audio and any(m.kernel_size == m.stride == (1, 1) and m.padding == (0, 0) for m in audio.values())
    report = mmkernels.patch(model, kernels=["patch_embed"])
    assert [(r.module_path, r.family) for r in report.replaced] == [
        ("image_embed.img_processor.embeddings.patch_embedding", "Phi-4-multimodal vision (patch conv)")]
    assert not any(s.module_path in audio for s in report.skipped)
    assert not any("forward" in m.__dict__ or ORIGINALS_ATTR in m.__dict__ for m in audio.values())


# --------------------------------------------------------------------------------------
# Specs that name their conv's path


def sam_spec() -> ConvPatchSpec:
    return next(spec for spec in CONV_PATCH_SPECS if spec.model_type == "sam_vision_model")


def test_without_its_path_the_spec_would_take_the_neck_conv_too():
    """SAM's 1x1 stride-1 neck conv passes every conv check: the spec's path is what keeps
    it out (the same spec without a path replaces it too)."""
    model = sam_tower()
    options = PatchOptions()
    report = patch_model(model, [ConvPatchRule(dataclasses.replace(sam_spec(), conv=None))], kernels=["patch_embed"],
                         options=options)  # fmt: skip
    assert [r.module_path for r in report.replaced] == ["vision_encoder.patch_embed.projection",
                                                        "vision_encoder.neck.conv1"]  # fmt: skip
    unpatch_model(model)
    report = patch_model(model, [ConvPatchRule(sam_spec())], kernels=["patch_embed"], options=options)
    assert [r.module_path for r in report.replaced] == ["vision_encoder.patch_embed.projection"]
    assert [s.code for s in report.skipped] == []


def test_the_conv_matched_is_the_one_at_the_path_now():
    """A conv replaced at the path: the new one is patched; the old one, still in the tower
    under the same model_type but elsewhere, is neither patched nor reported."""
    model = sam_tower()
    patch_embed = model.vision_encoder.patch_embed
    old = patch_embed.projection
    mmkernels.patch(model, kernels=["patch_embed"])
    mmkernels.unpatch(model)
    new = torch.nn.Conv2d(3, old.out_channels, PATCH, stride=PATCH)
    patch_embed.projection, patch_embed.previous = new, old
    report = mmkernels.patch(model, kernels=["patch_embed"])
    assert [r.module_path for r in report.replaced] == ["vision_encoder.patch_embed.projection"]
    assert "forward" in new.__dict__ and "forward" not in old.__dict__
    assert not [s for s in report.skipped if s.module_path == "vision_encoder.patch_embed.previous"]


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_patched_tower_with_a_conv_path_copies_and_pickles(how):
    """Copies rebuild the conv's replacement from its rule (whose notes of convs start empty)."""
    import copy
    import pickle

    tower = TOWERS["sam"]
    model = tower.build()
    raw, extra = tower.inputs()
    pixels = normalized(raw)
    before = output(tower, model, pixels, extra)
    mmkernels.patch(model, kernels=["patch_embed"])
    want = output(tower, model, pixels, extra)
    other = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    conv = other.get_submodule(tower.conv)
    assert "forward" in conv.__dict__
    torch.testing.assert_close(output(tower, other, pixels, extra), want, rtol=0, atol=0)
    mmkernels.unpatch(other)
    assert "forward" not in conv.__dict__
    torch.testing.assert_close(output(tower, other, pixels, extra), before, rtol=0, atol=0)
    report = mmkernels.patch(other, kernels=["patch_embed"])
    assert [r.module_path for r in report.replaced] == [tower.conv]


def test_deepseek_vl_hybrid_patches_the_sam_patch_conv_and_siglip_not_the_necks(monkeypatch):
    """DeepSeek-VL-hybrid: a SigLIP tower and a SAM tower (sam_vision_model) whose neck, and a
    second neck of the model's own (DeepseekVLSamVisionNeck carries the SAM config too), each
    start with a 1x1 conv. The SigLIP embeddings and the SAM patch conv are replaced, no neck
    conv is replaced or reported; the image features agree."""
    config_class, model_class = classes("deepseek_vl_hybrid", "DeepseekVLHybridConfig", "DeepseekVLHybridModel")
    config = config_class(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=PATCH),
        high_res_vision_config=dict(model_type="sam_vision_model", **SAM),
        text_config=dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=128),
    )  # fmt: skip
    model = model_class(config).eval()
    with torch.no_grad():
        model.high_res_vision_alpha.fill_(1.0)  # zero at init: the neck's branch would not count
    pixels = normalized(torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8))
    high_res = normalized(torch.randint(0, 256, (2, 3, 56, 56), dtype=torch.uint8))

    def features():
        with torch.no_grad():
            out = model.get_image_features(pixels, high_res)
        return out.pooler_output, out.last_hidden_state, out.high_res_vision_last_hidden_state

    before = features()
    conv = "high_res_vision_model.vision_encoder.patch_embed.projection"
    necks = ["high_res_vision_model.vision_encoder.neck.conv1", "high_res_vision_neck.conv1"]
    assert all(not _conv_reasons(model.get_submodule(path), IMAGE_FORM) for path in necks)
    report = mmkernels.patch(model, kernels=["patch_embed"])
    assert [(r.module_path, r.family) for r in report.replaced] == [
        (conv, "SAM vision (patch conv)"),
        ("vision_model.embeddings", "SigLIP vision"),
    ]
    others = [path for path in conv_paths(model) if path not in (conv, "vision_model.embeddings.patch_embedding")]
    assert set(necks) <= set(others)
    assert not [s for s in report.skipped if s.module_path in others]
    calls = []
    real = mmkernels.ops.patch_embed
    monkeypatch.setattr(mmkernels.ops, "patch_embed", lambda *a, **k: calls.append(1) or real(*a, **k))
    after = features()
    assert len(calls) == 2
    assert error(after, before) <= RTOL
    mmkernels.unpatch(model)
    torch.testing.assert_close(features(), before, rtol=0, atol=0)


@pytest.mark.parametrize("conv", ["", "patch_embed..projection", "patch_embed.0x"])
def test_a_conv_path_must_be_dotted_attribute_names(conv):
    with pytest.raises(ValueError, match="dotted attribute path"):
        ConvPatchSpec(family="x", model_type="x_vision", conv=conv)
