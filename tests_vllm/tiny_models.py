"""Tiny zoo models on disk, in the parameter names vLLM 0.32 loads.

``mmkernels.zoo.save`` writes what transformers 5 writes; the zoo's Qwen3.5 has no
processor, nor the zoo's InternVL, so their processor_config.json (Qwen3-VL's
processor; InternVLProcessor, one tile per image), which vLLM builds, is written here. Its text model runs in bf16 in the lane (run_offline.DTYPE). vLLM 0.32's LLaVA maps the
post-4.52 names (``model.vision_tower.`` ...) but not the CLIP tower's inner
``vision_model.`` level that transformers 5 drops (``vision_tower.embeddings...``), so the
LLaVA checkpoint is rewritten with that level put back. Real weights (not
``load_format="dummy"``, whose every parameter is the same uniform(-1e-3, 1e-3) draw and
whose logits are flat) make greedy tokens depend on the image features, so a parity test
can see a wrong merge or a wrong patch embedding.

Run as a script to write the models: ``python tests_vllm/tiny_models.py OUT_DIR``.
"""

from __future__ import annotations

import json
import pathlib
import sys

FAMILIES = ("llava", "qwen2_vl", "qwen3_5", "internvl")

# A chat template for the OpenAI server: the zoo's tokenizers carry none. Images become
# the family's placeholder, in message order.
_CHAT_TEMPLATES = {
    "llava": (
        "{% for m in messages %}{{ m['role'] }} : "
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
        "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }} "
        "{% else %}<image> {% endif %}{% endfor %}{% endif %}{% endfor %}assistant :"
    ),
    "qwen2_vl": (
        "{% for m in messages %}{{ m['role'] }} : "
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
        "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }} "
        "{% else %}<|vision_start|><|image_pad|><|vision_end|> {% endif %}{% endfor %}{% endif %}"
        "{% endfor %}assistant :"
    ),
}
_CHAT_TEMPLATES["qwen3_5"] = _CHAT_TEMPLATES["qwen2_vl"]  # the same placeholder
_CHAT_TEMPLATES["internvl"] = _CHAT_TEMPLATES["llava"].replace("<image>", "<IMG_CONTEXT>")


def _rename(path: pathlib.Path, rename) -> None:
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    tensors = load_file(str(file))
    save_file({rename(k): v.contiguous() for k, v in tensors.items()}, str(file), metadata={"format": "pt"})


def _llava_name(key: str) -> str:
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + key[len("vision_tower.") :]
    return key


def _qwen3_5_processor_config() -> dict:
    """processor_config.json for the zoo's Qwen3.5, which the zoo builds without a
    processor (its inputs are pre-flattened patches): Qwen3-VL's processor, images in
    14-pixel patches merged 2x2, 4 to 16 tokens per image, as the zoo's Qwen2-VL."""
    from transformers import Qwen2VLImageProcessor

    merged = (14 * 2) ** 2
    image = json.loads(Qwen2VLImageProcessor(min_pixels=4 * merged, max_pixels=16 * merged, patch_size=14,
                                             temporal_patch_size=2, merge_size=2).to_json_string())  # fmt: skip
    video = {k: v for k, v in image.items() if k not in ("image_processor_type", "min_pixels", "max_pixels")}
    video.update(video_processor_type="Qwen3VLVideoProcessor", do_sample_frames=False)
    return {"processor_class": "Qwen3VLProcessor", "image_processor": image, "video_processor": video}


def _internvl_processor_config() -> dict:
    """processor_config.json for the zoo's InternVL (built without a processor): one 56x56
    tile per image (no dynamic tiling), 4 tokens each after the 0.5 pixel shuffle."""
    from transformers import GotOcr2ImageProcessor

    image = json.loads(GotOcr2ImageProcessor(size={"height": 56, "width": 56}, crop_to_patches=False,
                                             image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
                       .to_json_string())  # fmt: skip
    video = {k: v for k, v in image.items() if k not in ("image_processor_type", "crop_to_patches", "min_patches",
                                                          "max_patches")}  # fmt: skip
    video.update(video_processor_type="InternVLVideoProcessor", do_sample_frames=False)
    return {"processor_class": "InternVLProcessor", "image_seq_length": 4, "image_processor": image,
            "video_processor": video}  # fmt: skip


def write(family: str, root) -> pathlib.Path:
    """Write the tiny ``family`` under ``root / family``; returns the folder."""
    from mmkernels import zoo

    path = zoo.save(family, pathlib.Path(root) / family)
    if family == "llava":
        _rename(path, _llava_name)
    processor_config = {"qwen3_5": _qwen3_5_processor_config, "internvl": _internvl_processor_config}.get(family)
    if processor_config is not None:
        (path / "processor_config.json").write_text(json.dumps(processor_config(), indent=2) + "\n")
    (path / "chat_template.jinja").write_text(_CHAT_TEMPLATES[family])
    return path


def write_quantized(family: str, source: pathlib.Path, root, scheme: str, group_size: int = 128) -> pathlib.Path:
    """The tiny ``family`` (the same weights as :func:`write`'s ``source``) with its
    projector quantized on the Hugging Face side and saved by ``save_pretrained``: the
    checkpoint's ``quantization_config`` (quant_method "mmkernels") and stored codes, in
    the names vLLM loads. Written under ``root / f"{family}-{scheme}"``."""
    import shutil
    import tempfile

    import mmkernels
    from mmkernels import zoo

    model = zoo.build(family, batch=1).model  # write() saved zoo.save's model: the same seed, the same weights
    mmkernels.quantize_projector(model, scheme, group_size=group_size)
    path = pathlib.Path(root) / f"{family}-{scheme}"
    shutil.copytree(source, path)
    with tempfile.TemporaryDirectory() as saved:
        model.save_pretrained(saved)
        for name in ("model.safetensors", "config.json"):
            shutil.copy(pathlib.Path(saved) / name, path / name)
    if family == "llava":
        _rename(path, _llava_name)
    return path


if __name__ == "__main__":
    out = pathlib.Path(sys.argv[1])
    print(json.dumps({f: str(write(f, out)) for f in FAMILIES}))
