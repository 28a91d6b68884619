"""The model-level benchmarks, checked on the CPU without running a real-width model:
the configs carry the checkpoints' real dimensions (counted on the meta device), the
inputs hold exactly the placeholder tokens and pixels the models expect, the output
check catches wrong outputs, and the mmkernels provider refuses a patch that replaced
nothing. ``tests/test_bench_pipeline.py`` runs every provider of both benchmarks on the
CPU (``--dry-run``) and through the fake-timed pipeline."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import bench_models as bm  # noqa: E402
from benchmarks import harness  # noqa: E402


def test_registered_as_model_benchmarks():
    registry = harness.registered()
    names = ("llava-1.5-7b", "qwen2-vl-7b", "llama-3.2-11b-vision")
    assert [registry[n].kind for n in names] == ["model"] * 3
    assert [registry[n].size_param for n in names] == ["images", "patches", "images"]
    for bench in bm.BENCHMARKS:
        assert [p.name for p in bench.providers] == ["hf-eager", "torch.compile", "mmkernels"]
        assert bench.providers[1].optional  # a compile failure is a skip, by name
    for bench in (bm.LLAVA_BENCHMARK, bm.QWEN2_VL_BENCHMARK):
        assert [c.images for c in bench.cases] == [1, 4, 16] and {c.images for c in bench.quick_cases} == {1, 16}
        assert not bench.providers[2].optional  # patching LLaVA / Qwen2-VL must work
    assert [c.images for c in bm.MLLAMA_BENCHMARK.cases] == [1, 2, 4]
    assert bm.MLLAMA_BENCHMARK.providers[2].optional  # not wired yet: skipped, quoting the patch report


def test_real_configs_have_the_checkpoints_dimensions():
    llava = bm.model_config("llava", "real")
    v, t = llava.vision_config, llava.text_config
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads) == (1024, 4096, 24, 16)
    assert (v.image_size, v.patch_size, llava.vision_feature_layer, llava.image_token_index) == (336, 14, -2, 32000)
    assert (t.hidden_size, t.intermediate_size, t.num_attention_heads, t.vocab_size) == (4096, 11008, 32, 32064)
    assert t.num_hidden_layers == 1  # one decoder layer of 32: documented in the module docstring
    qwen = bm.model_config("qwen2_vl", "real")
    v, t = qwen.vision_config, qwen.text_config
    assert (v.embed_dim, v.depth, v.num_heads, v.mlp_ratio, v.hidden_size) == (1280, 32, 16, 4, 3584)
    assert (v.patch_size, v.temporal_patch_size, v.spatial_merge_size) == (14, 2, 2)
    assert (t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads) == (3584, 18944, 28, 4)
    assert (t.vocab_size, t.num_hidden_layers, qwen.image_token_id) == (152064, 1, 151655)
    mllama = bm.model_config("mllama", "real")
    v, t = mllama.vision_config, mllama.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_global_layers, v.attention_heads) == (1280, 32, 8, 16)
    assert (v.image_size, v.patch_size, v.max_num_tiles, v.vision_output_dim) == (560, 14, 4, 7680)
    assert (t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads) == (4096, 14336, 32, 8)
    assert (t.num_hidden_layers, t.cross_attention_layers, mllama.image_token_index) == (1, [0], 128256)


def _params_on_meta(family: str) -> dict[str, int]:
    with torch.device("meta"):
        model = bm._model_class(family)._from_config(bm.model_config(family, "real"))
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        counts[top] = counts.get(top, 0) + p.numel()
    return counts


def test_real_models_have_the_real_parameter_counts():
    llava = _params_on_meta("llava")
    assert 303e6 < llava["vision_tower"] < 305e6  # CLIP ViT-L/14-336 vision tower
    assert llava["multi_modal_projector"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    # the Llama-2-7B embedding table and one of its 32 decoder layers (~202M) + norm
    assert llava["language_model"] == 32064 * 4096 + 4 * 4096 * 4096 + 3 * 4096 * 11008 + 3 * 4096
    qwen = _params_on_meta("qwen2_vl")
    assert 670e6 < qwen["visual"] < 680e6  # Qwen2-VL-7B's 675M-parameter vision tower with its merger
    mllama = _params_on_meta("mllama")
    assert 0.8e9 < mllama["vision_model"] < 0.9e9  # Llama-3.2-11B-Vision's tower (~0.85B)
    assert mllama["multi_modal_projector"] == 7680 * 4096 + 4096


@pytest.mark.parametrize("case", bm.LLAVA_CASES + bm.QWEN2_VL_CASES + bm.MLLAMA_CASES, ids=lambda c: c.name)
def test_inputs_hold_the_placeholders_and_pixels_the_model_expects(case):
    inputs = bm.make_model_inputs(case, "cpu", 0)
    ids, mask = inputs.kwargs["input_ids"], inputs.kwargs["attention_mask"]
    assert ids.shape == (case.images, max(case.prompt_lengths()))
    assert mask.sum(1).tolist() == case.prompt_lengths()
    assert not bool((ids * (1 - mask)).any()) or case.family == "qwen2_vl"  # LLaVA pads with 0
    if case.family == "llava":
        assert (ids == bm.LLAVA_IMAGE_TOKEN).sum(1).tolist() == [576] * case.images
        assert inputs.kwargs["pixel_values"].shape == (case.images, 3, 336, 336)
        assert case.params()["patches"] == 576 * case.images
    elif case.family == "mllama":
        assert (ids == bm.MLLAMA_IMAGE_TOKEN).sum(1).tolist() == [1] * case.images
        assert inputs.kwargs["pixel_values"].shape == (case.images, 1, 4, 3, 560, 560)
        cross = inputs.kwargs["cross_attention_mask"]
        assert cross.shape == (case.images, ids.shape[1], 1, 4)
        image_at = (ids == bm.MLLAMA_IMAGE_TOKEN).int().argmax(1)
        for i in range(case.images):  # from the <|image|> token to the end of the prompt, every tile
            seen = cross[i, :, 0, :].all(-1)
            assert seen.nonzero().squeeze(1).tolist() == list(range(int(image_at[i]), int(mask[i].sum())))
        assert case.params()["patches"] == 4 * 1600 * case.images and case.params()["vision_layers"] == 40
    else:
        per_image = [(h // 14) * (w // 14) for h, w in case.image_sizes]
        assert (ids == bm.QWEN_IMAGE_TOKEN).sum(1).tolist() == [n // 4 for n in per_image]
        assert inputs.kwargs["pixel_values"].shape == (sum(per_image), 3 * 2 * 14 * 14)
        assert inputs.kwargs["image_grid_thw"].tolist() == [[1, h // 14, w // 14] for h, w in case.image_sizes]
        assert ((ids == bm.QWEN_VISION_START).sum(1) == 1).all() and ((ids == bm.QWEN_VISION_END).sum(1) == 1).all()
        if "mm_token_type_ids" in inputs.kwargs:
            assert torch.equal(inputs.kwargs["mm_token_type_ids"].bool(), ids == bm.QWEN_IMAGE_TOKEN)
        assert len(set(case.image_sizes)) == min(case.images, 4)  # varied resolution
    again = bm.make_model_inputs(case, "cpu", 0)
    assert all(torch.equal(again.kwargs[k], v) for k, v in inputs.kwargs.items() if isinstance(v, torch.Tensor))


def test_scaled_cases_keep_the_family_and_are_tiny():
    for case in bm.LLAVA_CASES + bm.QWEN2_VL_CASES + bm.MLLAMA_CASES:
        small = case.scaled()
        assert small.family == case.family and small.scale == "tiny" and small.dtype == "float32"
        assert 1 <= small.images <= min(case.images, 2)
        assert all(h % 28 == 0 and w % 28 == 0 for h, w in small.image_sizes)
        assert small.params()["vision_width"] == 64 and small.params()["llm_layers"] == 1


def test_compare_hidden_catches_wrong_outputs():
    expected = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    assert bm.compare_hidden(expected.clone(), expected) is None
    noisy = expected + 0.01 * expected.float().std() * torch.randn_like(expected.float()).to(torch.bfloat16)
    assert bm.compare_hidden(noisy, expected) is None  # bf16 rounding-sized differences pass
    wrong = expected.clone()
    wrong[0, 3] = 0  # one position lost (a missing image row)
    assert "relative error" in bm.compare_hidden(wrong, expected)
    assert "expected torch.bfloat16(2, 7, 64)" in bm.compare_hidden(expected[:, :6], expected)
    nan = expected.clone()
    nan[1, 1, 1] = float("nan")
    assert "not finite" in bm.compare_hidden(nan, expected)
    assert bm.compare_hidden(expected.float(), expected.float() * 1.001) is not None  # fp32: 1e-4


def test_mmkernels_provider_refuses_a_patch_that_replaced_nothing(monkeypatch):
    import mmkernels

    bm.clear_models()
    monkeypatch.setattr(mmkernels, "patch", lambda model: types.SimpleNamespace(replaced=[]))
    with pytest.raises(RuntimeError, match="replaced nothing in LlavaModel"):
        bm.build_model("llava", "tiny", torch.float32, torch.device("cpu"), "mmkernels")
    bm.clear_models()


def test_mllama_gates_are_open_so_the_check_sees_the_vision_path():
    model = bm.build_model("mllama", "tiny", torch.float32, torch.device("cpu"))
    gates = {n.rsplit(".", 1)[-1]: round(float(p.detach().flatten()[0]), 6)
             for n, p in model.named_parameters() if n.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate"))}  # fmt: skip
    assert gates == {"cross_attn_attn_gate": 0.5, "cross_attn_mlp_gate": 0.8}
    case = bm.MLLAMA_CASES[0].scaled()
    inputs = bm.make_model_inputs(case, "cpu", 0)
    expected = bm.expected_hidden(inputs)
    other = bm.make_model_inputs(case, "cpu", 0)
    other.kwargs["pixel_values"] = other.kwargs["pixel_values"] + 1.0  # other images, same text
    assert "relative error" in bm.compare_hidden(bm.expected_hidden(other), expected)
    bm.clear_models()
