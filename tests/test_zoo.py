"""The tiny model zoo: every family builds, its inputs are valid for the real (unpatched)
model, generate() runs, and save() writes a folder that loads back offline."""

import inspect
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub are imported

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from packaging.version import Version  # noqa: E402

from mmkernels import zoo  # noqa: E402
from zoo_helpers import build_or_skip  # noqa: E402

# Keyword names under which the merge methods take each modality's features; a
# positional argument after (input_ids, inputs_embeds) is the image features, or the
# features of the kind whose placeholder id follows them (MiniCPM-V's
# get_placeholder_mask(input_ids, inputs_embeds, features, token_id), once per kind).
FEATURE_ARGUMENTS = {"image": ("image_features", "image_hidden_states"), "video": ("video_features",),
                     "audio": ("audio_features",)}  # fmt: skip
MERGE_METHODS = ("get_placeholder_mask", "inputs_merger")  # Idefics3 merges in inputs_merger
# Families whose media come first in the prompt, before BOS and the text (their processors' layout).
MEDIA_FIRST = ("paligemma", "blip_2")
# (family, modality) whose placeholder count the unpatched forward does not check: the Omni
# thinkers scatter their audio features with masked_scatter alone, which fills the
# placeholders it finds from the first rows (the patched merge checks it: tests/test_omni_hf.py).
UNCHECKED_COUNTS = {("qwen2_5_omni_thinker", "audio"), ("qwen3_omni_moe_thinker", "audio")}


@pytest.fixture(scope="module", params=zoo.FAMILIES)
def tiny(request) -> zoo.TinyModel:
    return build_or_skip(request.param)


@pytest.fixture(scope="module")
def logits(tiny) -> torch.Tensor:
    with torch.no_grad():
        return tiny.model(**tiny.inputs).logits


def _inner_model(tiny):
    inner = [module for module in tiny.model.modules() if type(module).__name__ == tiny.inner_model_class]
    assert len(inner) == 1, f"expected one {tiny.inner_model_class} in {type(tiny.model).__name__}"
    return inner[0]


def _runs(row: torch.Tensor, token_id: int) -> list[tuple[int, int]]:
    """[start, end) of each run of ``token_id`` in ``row``."""
    runs, start = [], None
    for i, is_token in enumerate((row == token_id).tolist() + [False]):
        if is_token and start is None:
            start = i
        elif not is_token and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _count(tiny, modality) -> list[int]:
    return (tiny.inputs["input_ids"] == tiny.placeholder_ids[modality]).sum(-1).tolist()


def _text_inputs(tiny) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of the prompts: the decoder's for an encoder-decoder over
    pixels (VisionEncoderDecoder, whose encoder takes no text)."""
    prefix = "" if "input_ids" in tiny.inputs else "decoder_"
    return tiny.inputs[f"{prefix}input_ids"], tiny.inputs[f"{prefix}attention_mask"]


def test_families_are_listed():
    required = (
        "llava llava_next llava_onevision qwen2_vl qwen2_5_vl paligemma gemma3 qwen2_audio blip_2 "
        "vision_encoder_decoder mllama whisper"
    ).split()
    assert set(zoo.FAMILIES) >= set(required)
    with pytest.raises(ValueError, match="family"):
        zoo.build("no_such_family")


def test_model_is_tiny_eval_cpu(tiny):
    model = tiny.model
    assert not model.training
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    text = model.config.get_text_config()
    assert text.num_hidden_layers == 2
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    assert head_dim in (32, 64), "vLLM's CPU attention takes head sizes 32/64/80"


def test_inputs_batch_with_left_padding(tiny):
    ids, mask = _text_inputs(tiny)
    assert ids.shape[0] == 2 and mask.shape == ids.shape
    lengths = mask.sum(-1).tolist()
    assert lengths[0] != lengths[1], "prompts of different lengths exercise padding"
    shorter = lengths.index(min(lengths))
    assert mask[shorter, 0] == 0 and mask[shorter, -1] == 1, "padding is on the left"
    assert (ids != tiny.tokenizer.unk_token_id).all(), "every prompt word is in the vocabulary"
    for modality in tiny.placeholder_ids:
        assert sum(_count(tiny, modality)) > 0, f"no {modality} placeholders"
    if not tiny.placeholder_ids:
        return  # VisionEncoderDecoder: the pixels go to the encoder, the prompt is text only
    # The second sample has several media with text before, between and after them;
    # PaliGemma puts its images side by side in front of the text, as its processor does;
    # BLIP-2 takes one image per prompt, its query tokens in front of BOS and the text.
    main = "audio" if "audio" in tiny.placeholder_ids else "image"
    runs = _runs(ids[1], tiny.placeholder_ids[main])
    images_first = tiny.family in MEDIA_FIRST
    assert len(runs) >= (1 if images_first else 2)
    assert runs[-1][1] < ids.shape[1] and (images_first or runs[0][0] > 0)
    if tiny.family == "llava_next":
        assert len({end - start for start, end in runs}) == len(runs), "anyres: token counts differ"


def test_forward_gives_finite_logits(tiny, logits):
    batch, length = _text_inputs(tiny)[0].shape
    assert logits.shape == (batch, length, tiny.model.config.get_text_config().vocab_size)
    assert torch.isfinite(logits).all()


def test_placeholders_match_features(tiny, monkeypatch):
    """The number of placeholder tokens equals the number of features the towers make,
    checked on the arguments of the model's own merge method (get_placeholder_mask)."""
    if not tiny.placeholder_ids:
        pytest.skip("encoder-decoders (VisionEncoderDecoder, Whisper) have no placeholders: the decoder cross-attends")
    inner = _inner_model(tiny)
    if tiny.family == "mllama":
        # Mllama merges nothing: one <|image|> token per image, and the text cross-attends to the
        # image tiles through cross_attention_mask (one image slot per <|image|> token).
        assert _count(tiny, "image") == [1, 3]
        slots = tiny.inputs["cross_attention_mask"].any(1).any(-1).sum(-1).tolist()
        assert slots == _count(tiny, "image")
        return
    if tiny.family == "blip_2":
        # Blip2's get_placeholder_mask takes no features: the Q-Former gives num_query_tokens rows per image.
        assert _count(tiny, "image") == [tiny.model.config.num_query_tokens] * len(tiny.inputs["pixel_values"])
        return
    merge = next((name for name in MERGE_METHODS if hasattr(inner, name)), None)
    if merge is None:
        # Qwen2-Audio checks inline; its own length helper gives the token count per clip.
        tower = inner.audio_tower
        _, per_clip = tower._get_feat_extract_output_lengths(tiny.inputs["feature_attention_mask"].sum(-1))
        assert sum(_count(tiny, "audio")) == int(per_clip.sum())
        return
    seen = {}
    parameters = inspect.signature(getattr(inner, merge)).parameters
    if list(parameters) == ["input_ids", "inputs_embeds"]:
        # Gemma 4's get_placeholder_mask takes no features at all: the rows its own feature
        # methods give (per image, per video) and the audio rows its encoder marks valid.
        def recording_features(modality, method):
            def recording(*args, **kwargs):
                output = method(*args, **kwargs)
                valid = output.attention_mask if modality == "audio" else None
                seen[modality] = int(valid.sum()) if valid is not None else sum(len(r) for r in output.pooler_output)
                return output

            return recording

        for modality in tiny.placeholder_ids:
            name = f"get_{modality}_features"
            monkeypatch.setattr(inner, name, recording_features(modality, getattr(inner, name)))
        with torch.no_grad():
            tiny.model(**tiny.inputs)
        assert seen == {modality: sum(_count(tiny, modality)) for modality in tiny.placeholder_ids}
        return
    if "audio" in tiny.placeholder_ids and "audio_features" not in parameters:
        # The Omni thinkers give their merge method no audio features: the rows of their
        # own get_audio_features are the count. (Gemma 3n's takes them: its padded rows.)
        get_audio_features = inner.get_audio_features

        def recording_audio(*args, **kwargs):
            output = get_audio_features(*args, **kwargs)
            seen["audio"] = output.last_hidden_state.shape[0]
            return output

        monkeypatch.setattr(inner, "get_audio_features", recording_audio)
    original = getattr(inner, merge)
    kind_of = {placeholder: modality for modality, placeholder in tiny.placeholder_ids.items()}

    def recording(input_ids, inputs_embeds, *args, **kwargs):
        positional = "image"
        if len(args) > 1 and isinstance(args[1], int) and args[1] in kind_of:
            positional = kind_of[args[1]]
        for modality, names in FEATURE_ARGUMENTS.items():
            given = [kwargs[name] for name in names if kwargs.get(name) is not None]
            if modality == positional and args and args[0] is not None:
                given.append(args[0])
            for features in given:
                seen[modality] = features.numel() // inputs_embeds.shape[-1]
        return original(input_ids, inputs_embeds, *args, **kwargs)

    monkeypatch.setattr(inner, merge, recording)
    with torch.no_grad():
        tiny.model(**tiny.inputs)
    assert seen == {modality: sum(_count(tiny, modality)) for modality in tiny.placeholder_ids}


def test_placeholder_mismatch_is_caught(tiny):
    """One placeholder fewer makes the unpatched forward raise: the counts are checked."""
    if tiny.family == "blip_2":
        pytest.skip("BLIP-2 does not check the count: masked_scatter fills the placeholders it finds")
    if tiny.family == "mllama":
        pytest.skip("Mllama does not check the count: cross_attention_mask maps tokens to images")
    if tiny.family == "idefics3" and Version(transformers.__version__) < Version("5.21"):
        # (Its image processor needs torchvision on these releases: built only where it is installed.)
        pytest.skip(f"Idefics3 of transformers {transformers.__version__} does not check the count (from 5.21 "
                    "on it does): masked_scatter fills the placeholders it finds")  # fmt: skip
    for modality, placeholder in tiny.placeholder_ids.items():
        if (tiny.family, modality) in UNCHECKED_COUNTS:
            continue
        inputs = dict(tiny.inputs)
        ids = inputs["input_ids"].clone()
        row, col = (ids == placeholder).nonzero()[-1].tolist()
        ids[row, col] = tiny.tokenizer.convert_tokens_to_ids(".")
        inputs["input_ids"] = ids
        with pytest.raises((ValueError, RuntimeError)), torch.no_grad():
            tiny.model(**inputs)


def test_generate_greedy(tiny):
    prompt = _text_inputs(tiny)[0]
    out = tiny.model.generate(**tiny.inputs, max_new_tokens=3, do_sample=False)
    if tiny.family == "whisper":
        # Whisper's own generate returns the tokens after the decoder prompt.
        assert out.shape[0] == prompt.shape[0] and 0 < out.shape[1] <= 3
        return
    assert out.shape[0] == prompt.shape[0] and prompt.shape[1] < out.shape[1] <= prompt.shape[1] + 3
    assert torch.equal(out[:, : prompt.shape[1]], prompt)


def test_same_seed_same_model_and_inputs(tiny):
    again = zoo.build(tiny.family)
    weights, weights_again = tiny.model.state_dict(), again.model.state_dict()
    assert weights.keys() == weights_again.keys()
    assert all(torch.equal(weights[name], weights_again[name]) for name in weights)
    assert tiny.inputs.keys() == again.inputs.keys()
    assert all(torch.equal(tiny.inputs[k], again.inputs[k]) for k in tiny.inputs)
    other = zoo.build(tiny.family, seed=1)
    assert not torch.equal(other.model.get_output_embeddings().weight, tiny.model.get_output_embeddings().weight)


def test_batch_and_dtype_options(tiny):
    single = zoo.build(tiny.family, batch=1, dtype=torch.bfloat16)
    assert _text_inputs(single)[0].shape[0] == 1
    assert all(p.dtype == torch.bfloat16 for p in single.model.parameters())
    assert all(v.dtype == torch.bfloat16 for v in single.inputs.values() if v.is_floating_point())
    with torch.no_grad():
        assert torch.isfinite(single.model(**single.inputs).logits.float()).all()
    three = zoo.build(tiny.family, batch=3)
    with torch.no_grad():
        assert three.model(**three.inputs).logits.shape[0] == 3


def test_save_loads_back_offline(tiny, logits, tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    # transformers 5.17 exports a torchvision-only placeholder as transformers.AutoImageProcessor
    from transformers.models.auto.image_processing_auto import AutoImageProcessor
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    from transformers.utils import is_torchvision_available

    path = zoo.save(tiny.family, tmp_path / tiny.family)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    assert config.model_type == tiny.model.config.model_type
    loaded = type(tiny.model).from_pretrained(path, local_files_only=True).eval()
    if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        auto = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
        assert type(auto) is type(tiny.model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**tiny.inputs).logits, logits, rtol=0, atol=0)

    if not (path / "processor_config.json").exists():
        # A family built without a processor (the generic merge rule's): its tokenizer.
        assert tiny.processor is None
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        assert len(tokenizer) == len(tiny.tokenizer) and tokenizer.padding_side == "left"
        return
    processor_config = json.loads((path / "processor_config.json").read_text())
    needs_torchvision = tiny.processor is None  # a processor with a video processor
    if not needs_torchvision or is_torchvision_available():
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        assert type(processor).__name__ == processor_config["processor_class"]
        tokenizer = processor.tokenizer
    else:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        assert json.loads(image_processor.to_json_string()) == processor_config["image_processor"]
        assert processor_config["video_processor"]["video_processor_type"].endswith("VideoProcessor")
    assert len(tokenizer) == len(tiny.tokenizer)
    assert tokenizer.padding_side == "left"
    for token_id in tiny.placeholder_ids.values():
        assert tokenizer.convert_ids_to_tokens(token_id) == tiny.tokenizer.convert_ids_to_tokens(token_id)
    text = tiny.tokenizer.decode(_text_inputs(tiny)[0][0])
    assert tokenizer(text)["input_ids"] == tiny.tokenizer(text)["input_ids"]
