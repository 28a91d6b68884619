"""IDEFICS (Flamingo-style gated cross-attention) through the ``"mmkernels"`` attention
implementation: a tiny random-init ``IdeficsForVisionText2Text`` built from its real
config class (no download), gates opened so the cross-attention reaches the logits.

Every attention call (the vision tower, the text self-attention, the gated
cross-attention from text to the image tokens of ``image_attention_mask``) runs the op,
no SDPA fallback; fp32 logits agree with "sdpa" within 1e-5 relative error on the real
tokens of a left-padded batch in which some text rows see no image, one row sees the
second of two images, and greedy tokens agree.
"""

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

from mmkernels.integrations import hf_attention as ha  # noqa: E402
from mmkernels.testing import relative_error  # noqa: E402

RTOL = 1e-5


@pytest.fixture(scope="module")
def idefics():
    from transformers import IdeficsConfig, IdeficsForVisionText2Text

    ha.register_attention()
    config = IdeficsConfig(
        vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
        cross_layer_interval=1, qk_layer_norms=False, use_resampler=False, additional_vocab_size=2,
        vision_config=dict(embed_dim=32, image_size=28, patch_size=7, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=48),
    )  # fmt: skip
    torch.manual_seed(0)
    model = IdeficsForVisionText2Text(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "alpha" in name:  # the tanh gates start at 0: open them so the images matter
                parameter.fill_(0.7)
    batch, length, images = 2, 12, 2
    image_mask = torch.zeros(batch, length, images, dtype=torch.long)
    image_mask[0, 2:7, 0] = 1  # tokens after the first image see it
    image_mask[0, 7:, 1] = 1  # ... then only the second (IDEFICS' "attend to the last image")
    image_mask[1, 4:, 0] = 1  # the first tokens of each row see no image
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[1, :2] = 0  # left padding
    inputs = dict(
        input_ids=torch.randint(3, 90, (batch, length)),
        pixel_values=torch.randn(batch, images, 3, 28, 28),
        image_attention_mask=image_mask,
        attention_mask=attention_mask,
    )
    return model, inputs


def _logits(model, inputs, implementation):
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(**inputs).logits


def test_every_attention_call_runs_the_op_and_matches_sdpa(idefics):
    model, inputs = idefics
    try:
        reference = _logits(model, inputs, "sdpa")
        with ha.record_routes() as routes:
            logits = _logits(model, inputs, "mmkernels")
    finally:
        model.set_attn_implementation("sdpa")
    # 1 vision layer + 2 text layers x (gated cross-attention + self-attention).
    assert dict(routes) == {"varlen": 5}
    real = inputs["attention_mask"].bool()
    error = relative_error(logits[real], reference[real])
    assert error <= RTOL, f"relative error {error:.3e}"
    # The images matter: the cross-attention is not inert.
    shuffled = dict(inputs, pixel_values=inputs["pixel_values"].flip(1))
    assert relative_error(_logits(model, shuffled, "sdpa")[real], reference[real]) > 1e-3
    model.set_attn_implementation("sdpa")


def test_greedy_tokens(idefics):
    model, inputs = idefics
    try:
        model.set_attn_implementation("sdpa")
        with torch.no_grad():
            expected = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        model.set_attn_implementation("mmkernels")
        with torch.no_grad():
            tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        model.set_attn_implementation("sdpa")
    assert torch.equal(tokens, expected)
