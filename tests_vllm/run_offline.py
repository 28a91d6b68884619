"""Offline vllm.LLM run for the vLLM lane: greedy generation with images, results as JSON.

Run as a script (vLLM's CPU workers are spawned, so this needs its own ``__main__``):

    python tests_vllm/run_offline.py MODEL_DIR FAMILY OUT_JSON

The environment (MMKERNELS_DISABLE, TRITON_INTERPRET, ...) is set by the caller.
Prints nothing of its own; vLLM's and the plugin's log lines go to stderr.
"""

from __future__ import annotations

import json
import sys

# The prompts: one image, and three images of different sizes (tokens per image differ
# for Qwen2-VL's and Qwen3.5's dynamic resolution; LLaVA resizes each image to 56x56).
# "one_other": the text of "one" with another image, to show the answers depend on the
# image features (a parity test that the features cannot move would prove nothing).
IMAGE_SIZES = {"one": [(40, 60)], "three": [(56, 56), (70, 50), (90, 40)], "one_other": [(60, 40)]}
PLACEHOLDER = {"llava": "<image>", "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
               "qwen3_5": "<|vision_start|><|image_pad|><|vision_end|>", "internvl": "<IMG_CONTEXT>"}
MAX_TOKENS = 8


def image(width: int, height: int, seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def prompts(family: str) -> list[dict]:
    ph = PLACEHOLDER[family]
    out = []
    for k, (name, sizes) in enumerate(IMAGE_SIZES.items()):
        text = "user : " + " and ".join([ph] * len(sizes)) + " describe the image . assistant :"
        images = [image(w, h, seed=10 * k + i) for i, (w, h) in enumerate(sizes)]
        out.append({"prompt": text, "multi_modal_data": {"image": images[0] if len(images) == 1 else images}})
    return out


# fp32 but where vLLM's CPU kernels take only bf16 (Qwen3.5's Gated DeltaNet layers).
DTYPE = {"qwen3_5": "bfloat16"}


def make_llm(model: str, dtype: str = "float32", **extra):
    """The lane's offline engine: eager, seeded, up to 3 images per prompt."""
    from vllm import LLM

    return LLM(model=model, seed=0, dtype=dtype, enforce_eager=True, max_model_len=512, max_num_seqs=4,
               limit_mm_per_prompt={"image": 3}, **extra)  # fmt: skip


def generate_greedy(llm, family: str):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=1, ignore_eos=True)
    return llm.generate(prompts(family), params, use_tqdm=False)


def main(model: str, family: str, out_path: str, tensor_parallel_size: str = "1", quantization: str = "") -> None:
    tp = int(tensor_parallel_size)
    extra = {"tensor_parallel_size": tp} if tp > 1 else {}
    if quantization:
        extra["quantization"] = quantization
    llm = make_llm(model, DTYPE.get(family, "float32"), **extra)
    results = generate_greedy(llm, family)
    rows = []
    for name, r in zip(IMAGE_SIZES, results):
        c = r.outputs[0]
        rows.append(
            {
                "name": name,
                "prompt_tokens": len(r.prompt_token_ids),
                "token_ids": list(c.token_ids),
                "logprobs": [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)],
            }
        )
    with open(out_path, "w") as f:
        json.dump(rows, f)


if __name__ == "__main__":
    main(*sys.argv[1:6])
