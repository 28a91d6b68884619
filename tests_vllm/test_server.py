"""``vllm serve`` (OpenAI-compatible HTTP on 127.0.0.1) with the plugin on and off, for the
tiny LLaVA and Qwen2-VL: same greedy answers with 1 and 3 images, the plugin registered
in every vLLM process and its kernels ran, a bounded concurrent load, and bad input
answered with vLLM's own error while the server keeps serving."""

from __future__ import annotations

import asyncio

import openai
import pytest

import logs
from conftest import vllm_env
from server import Server, chat_messages, png_data_url

ARCH = {"llava": "LlavaForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration"}
PATCH_LAYER = {"llava": "Conv2dLayer", "qwen2_vl": "Conv3dLayer"}
MAX_IMAGES = 3

# Distinct requests: (text, [(width, height, seed), ...]); 1 to 3 images of different sizes.
REQUESTS = [
    ("describe the image .", [(40, 60, 1)]),
    ("compare these images , which one is brighter ?", [(56, 56, 2), (70, 50, 3), (90, 40, 4)]),
    ("what is in this picture ?", [(84, 56, 5)]),
    ("compare the two images .", [(30, 30, 6), (100, 60, 7)]),
    ("describe the image .", [(60, 40, 8)]),
    ("which one is larger ?", [(50, 90, 9), (56, 56, 10), (40, 40, 11)]),
    ("caption this photo please .", [(70, 70, 12)]),
    ("what color is the sky in these ?", [(44, 66, 13), (66, 44, 14)]),
]
CONCURRENT = 32


def _messages(i: int) -> list[dict]:
    text, images = REQUESTS[i]
    return chat_messages(text, [png_data_url(w, h, seed) for w, h, seed in images])


def _params() -> dict:
    return dict(model="tiny", temperature=0.0, max_tokens=8, seed=0,
                extra_body={"return_token_ids": True, "ignore_eos": True})  # fmt: skip


def _answer(response) -> tuple[list[int], str]:
    choice = response.choices[0].model_dump()
    return choice["token_ids"], choice["message"]["content"]


def _client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def servers(request, tiny_models, tmp_path_factory):
    """(family, plugin-off server, plugin-on server); both start at once (their start-up
    is mostly waiting) and stop at the end of the family's tests."""
    family = request.param
    folder = tmp_path_factory.mktemp(f"serve-{family}")
    model = tiny_models[family]
    off = Server(model, vllm_env(plugin=False), folder / "off.log", MAX_IMAGES)
    on = Server(model, vllm_env(plugin=True), folder / "on.log", MAX_IMAGES)
    try:
        off.wait_ready()
        on.wait_ready()
        yield family, off, on
    finally:
        on.stop()
        off.stop()


@pytest.fixture(scope="module")
def expected(servers):
    """The plugin-off server's answer to each request, asked one at a time."""
    _, off, _ = servers
    client = _client(off)
    return [_answer(client.chat.completions.create(messages=_messages(i), **_params())) for i in range(len(REQUESTS))]


def test_plugin_registered_in_every_process(servers, expected):
    family, off, on = servers
    on_log, off_log = on.log(), off.log()
    registered = logs.registered(on_log)
    # The API server, the engine core and the worker each load the plugin.
    assert len(registered) >= 3, on_log[-4000:]
    for line in registered.values():
        assert "merge -> vLLM's shared _merge_multimodal_embeddings" in line, line
        assert "Conv2dLayer" in line and "Conv3dLayer" in line, line
    assert len(logs.disabled_pids(off_log)) >= 3 and not logs.registered(off_log), off_log[-4000:]
    assert on.proc.pid in registered  # the `vllm serve` process itself


def test_greedy_parity_and_kernels_ran(servers, expected):
    family, _, on = servers
    client = _client(on)
    for i in (0, 1):  # one image; three images of different sizes
        assert _answer(client.chat.completions.create(messages=_messages(i), **_params())) == expected[i]
    ran = {(r, backend, where) for r, backend, where, _ in logs.ran(on.log())}
    assert ran == {
        ("merge", "triton-interpreter", ARCH[family]),
        ("patch_embed", "triton-interpreter", PATCH_LAYER[family]),
        ("encoder_attention", "triton-interpreter", "MMEncoderAttention"),
    }, on.log()[-4000:]
    assert not logs.not_covered(on.log())
    assert not logs.ran(servers[1].log())  # plugin off: nothing of ours ran


def test_concurrent_load(servers, expected):
    """32 concurrent chat requests with images: 0 errors, each answer equal to the
    sequential plugin-off answer, the server alive afterwards."""
    _, _, on = servers
    order = [i % len(REQUESTS) for i in range(CONCURRENT)]

    async def run():
        client = openai.AsyncOpenAI(base_url=on.base_url + "/v1", api_key="unused", max_retries=0, timeout=600)
        try:
            return await asyncio.gather(
                *(client.chat.completions.create(messages=_messages(i), **_params()) for i in order),
                return_exceptions=True,
            )
        finally:
            await client.close()

    results = asyncio.run(run())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    mismatched = [i for i, r in zip(order, results) if _answer(r) != expected[i]]
    assert not mismatched, mismatched
    assert on.alive()
    assert not logs.not_covered(on.log())


def _error(server: Server, messages) -> tuple[int, str]:
    with pytest.raises(openai.APIStatusError) as info:
        _client(server).chat.completions.create(messages=messages, **_params())
    body = info.value.body if isinstance(info.value.body, dict) else {}
    error = body.get("error", body) if isinstance(body, dict) else {}
    return info.value.status_code, error.get("message") if isinstance(error, dict) else str(body)


@pytest.mark.parametrize("case", ["too_many_images", "corrupt_image"])
def test_bad_input_same_error_and_server_keeps_serving(servers, expected, case):
    _, off, on = servers
    if case == "too_many_images":
        messages = chat_messages("compare them .", [png_data_url(40, 40, s) for s in range(MAX_IMAGES + 1)])
    else:
        messages = chat_messages("describe the image .", ["data:image/png;base64,bm90IGFuIGltYWdlIGF0IGFsbA=="])
    status_off, message_off = _error(off, messages)
    status_on, message_on = _error(on, messages)
    assert 400 <= status_off < 500, (status_off, message_off)  # vLLM's own clean client error
    assert (status_on, message_on) == (status_off, message_off)
    # Both keep serving, with the same answers.
    assert on.alive() and off.alive()
    assert _answer(_client(on).chat.completions.create(messages=_messages(0), **_params())) == expected[0]
