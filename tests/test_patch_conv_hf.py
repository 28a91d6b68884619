"""The bare patch-conv rule on live Hugging Face vision towers whose positions are added
in the tower's own forward: Pixtral (rotary positions later) and Mllama (gated tile and
position embeddings inline). Tiny random-init towers built from their real config classes.

Patched vs unpatched: fp32 outputs within 1e-5 relative (the GEMM sums in another order),
the report names the conv, ``state_dict`` unchanged, ``unpatch`` exact, raw uint8 pixels
normalized in the kernel equal host-normalized pixels, and the calls the op does not
cover (a dtype mix, hooks, other strides) run the original ``Conv2d.forward``.
"""

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

import mmkernels  # noqa: E402
import mmkernels.ops  # noqa: E402
from mmkernels.backend import Backend, recent_decisions  # noqa: E402
from mmkernels.integrations.engine import ORIGINALS_ATTR  # noqa: E402
from mmkernels.testing import relative_error  # noqa: E402

RTOL = 1e-5
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


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


TOWERS = {
    "pixtral": (pixtral_tower, pixtral_inputs, "patch_conv"),
    "mllama": (mllama_tower, mllama_inputs, "patch_embedding"),
}


def normalized(raw: torch.Tensor) -> torch.Tensor:
    shape = [1] * raw.dim()
    shape[-3] = 3
    mean, std = torch.tensor(MEAN).view(shape), torch.tensor(STD).view(shape)
    return (raw.float() / 255 - mean) / std


def output(model, pixels, extra):
    with torch.no_grad():
        return model(pixel_values=pixels, **extra).last_hidden_state


@pytest.mark.parametrize("name", list(TOWERS))
def test_patched_conv_matches_and_unpatch_restores(name):
    build, inputs, conv_name = TOWERS[name]
    model = build()
    raw, extra = inputs()
    pixels = normalized(raw)
    before = output(model, pixels, extra)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = mmkernels.patch(model, kernels=["patch_embed"])
    assert [(r.module_path, r.class_name) for r in report.replaced] == [(conv_name, "Conv2d")]
    after = output(model, pixels, extra)
    assert any(d.op == "patch_embed" and d.backend is Backend.INTERPRETER for d in recent_decisions())
    assert relative_error(after, before) <= RTOL
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    mmkernels.unpatch(model)
    conv = getattr(model, conv_name)
    assert "forward" not in conv.__dict__ and ORIGINALS_ATTR not in conv.__dict__
    torch.testing.assert_close(output(model, pixels, extra), before, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(TOWERS))
def test_raw_uint8_pixels_normalized_in_the_kernel(name):
    build, inputs, _ = TOWERS[name]
    model = build()
    raw, extra = inputs()
    expected = output(model, normalized(raw), extra)
    mmkernels.patch(model, kernels=["patch_embed"], pixel_normalization=dict(mean=MEAN, std=STD))
    # The towers cast pixels to the weight dtype before the conv: 0..255 survive exactly.
    assert relative_error(output(model, raw, extra), expected) <= RTOL


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
