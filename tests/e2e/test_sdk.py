"""The official OpenAI and Anthropic Python SDKs against a running `semantic serve`.

Run through scripts/e2e.sh, which starts the server and sets
SEMANTIC_E2E_URL (base URL) and SEMANTIC_E2E_KEY (its --api-key).
"""

import json
import os
import uuid

import anthropic
import openai
import pytest

URL = os.environ.get("SEMANTIC_E2E_URL", "http://127.0.0.1:8000")
KEY = os.environ.get("SEMANTIC_E2E_KEY", "none")
MODEL = "semantic"


def oai(**kw):
    kw.setdefault("api_key", KEY)
    return openai.OpenAI(base_url=URL + "/v1", max_retries=0, **kw)


def ant(**kw):
    kw.setdefault("api_key", KEY)
    return anthropic.Anthropic(base_url=URL, max_retries=0, **kw)


# Recent anthropic SDKs have no `temperature` argument; the server still
# takes it (greedy replies make the comparisons below exact).
GREEDY = {"extra_body": {"temperature": 0}}


def session():
    return f"e2e-{uuid.uuid4().hex[:12]}"


COUNT = [{"role": "user", "content": "Count from one to ten in words."}]


# --- OpenAI ---------------------------------------------------------------


def test_openai_chat():
    r = oai().chat.completions.create(
        model=MODEL, messages=COUNT, max_tokens=16, temperature=0
    )
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0
    assert 0 < r.usage.completion_tokens <= 16
    assert r.usage.prompt_tokens_details.cached_tokens >= 0


def test_openai_stream_matches_plain_reply():
    client = oai()
    plain = client.chat.completions.create(
        model=MODEL, messages=COUNT, max_tokens=16, temperature=0
    )
    stream = client.chat.completions.create(
        model=MODEL,
        messages=COUNT,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    assert text == plain.choices[0].message.content
    assert finish == plain.choices[0].finish_reason
    assert usage.completion_tokens == plain.usage.completion_tokens


def test_openai_stop_sequence():
    client = oai()
    full = client.chat.completions.create(
        model=MODEL, messages=COUNT, max_tokens=24, temperature=0
    ).choices[0].message.content
    word = full.split()[2]
    r = client.chat.completions.create(
        model=MODEL, messages=COUNT, max_tokens=24, temperature=0, stop=[word]
    )
    assert r.choices[0].finish_reason == "stop"
    assert word not in r.choices[0].message.content
    assert full.startswith(r.choices[0].message.content)


def test_openai_second_turn_of_a_session_is_cached():
    client = oai(default_headers={"X-Session-ID": session()})
    msgs = [{"role": "user", "content": "Name a colour."}]
    first = client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=8, temperature=0
    )
    msgs += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "Name another one."},
    ]
    second = client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=8, temperature=0
    )
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens - 1, second.usage
    assert cached < second.usage.prompt_tokens


def test_openai_completions_and_models():
    client = oai()
    r = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0
    )
    assert "Paris" in r.choices[0].text
    models = client.models.list()
    assert models.data and models.data[0].id


WEATHER = {
    "name": "get_weather",
    "description": "Weather of a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def test_openai_models_retrieve():
    client = oai()
    served = client.models.list().data[0].id
    assert client.models.retrieve(served).id == served
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_openai_json_mode_replies_with_a_json_object():
    r = oai().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Return JSON with the fields name and age for Alice, 30."}],
        response_format={"type": "json_object"},
        max_tokens=120,
        temperature=0,
    )
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_openai_named_tool_choice_calls_the_tool():
    r = oai().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[{"type": "function", "function": WEATHER}],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=60,
        temperature=0,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments), dict)


def test_openai_errors_are_sdk_exceptions():
    client = oai()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=COUNT, n=2)
    assert e.value.status_code == 400
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=COUNT, max_tokens=0)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "wizard", "content": "hi"}]
        )
    assert e.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=MODEL, messages=COUNT, extra_headers={"X-Session-ID": "not/valid"}
        )
    with pytest.raises(openai.AuthenticationError):
        oai().with_options(api_key="wrong").models.list()


# --- Anthropic --------------------------------------------------------------


def test_anthropic_message():
    m = ant().messages.create(
        model=MODEL,
        max_tokens=16,
        system="You are brief.",
        messages=COUNT,
        **GREEDY,
    )
    assert m.role == "assistant"
    assert m.content[0].type == "text" and m.content[0].text
    assert m.stop_reason in ("end_turn", "max_tokens")
    assert m.usage.output_tokens > 0
    assert m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0) > 0


def test_anthropic_stream_matches_plain_reply():
    client = ant()
    kw = dict(model=MODEL, max_tokens=16, messages=COUNT, **GREEDY)
    plain = client.messages.create(**kw)
    with client.messages.stream(**kw) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == plain.content[0].text
    assert final.stop_reason == plain.stop_reason
    assert final.usage.output_tokens == plain.usage.output_tokens
    # The SDK swallows `ping`; the Rust tests check it is sent.
    kinds = [ev.type for ev in client.messages.create(stream=True, **kw)]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) <= {"content_block_delta"}


def test_anthropic_stop_sequence():
    client = ant()
    kw = dict(model=MODEL, max_tokens=24, messages=COUNT, **GREEDY)
    full = client.messages.create(**kw).content[0].text
    word = full.split()[2]
    m = client.messages.create(stop_sequences=[word], **kw)
    assert m.stop_reason == "stop_sequence"
    assert m.stop_sequence == word
    assert word not in m.content[0].text


def test_anthropic_second_turn_of_a_session_is_cached():
    client = ant()
    h = {"X-Session-ID": session()}
    msgs = [{"role": "user", "content": "Name a fruit."}]
    first = client.messages.create(
        model=MODEL, max_tokens=8, messages=msgs, extra_headers=h, **GREEDY
    )
    created = first.usage.cache_creation_input_tokens
    assert created > 0
    msgs += [
        {"role": "assistant", "content": first.content[0].text},
        {"role": "user", "content": "Another one?"},
    ]
    second = client.messages.create(
        model=MODEL, max_tokens=8, messages=msgs, extra_headers=h, **GREEDY
    )
    assert second.usage.cache_read_input_tokens > 0, second.usage


def test_anthropic_count_tokens_and_tools():
    client = ant()
    n = client.messages.count_tokens(model=MODEL, messages=COUNT)
    assert n.input_tokens > 0
    m = client.messages.create(
        model=MODEL,
        max_tokens=16,
        **GREEDY,
        tools=[
            {
                "name": "get_weather",
                "description": "Weather of a city",
                "input_schema": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                },
            }
        ],
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
    )
    assert m.stop_reason in ("end_turn", "max_tokens", "tool_use")
    if m.stop_reason == "tool_use":
        assert any(b.type == "tool_use" and b.name == "get_weather" for b in m.content)


def test_anthropic_tool_choice_tool_calls_it():
    tool = {"name": WEATHER["name"], "description": WEATHER["description"], "input_schema": WEATHER["parameters"]}
    m = ant().messages.create(
        model=MODEL,
        max_tokens=60,
        **GREEDY,
        tools=[tool],
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
    )
    assert m.stop_reason == "tool_use", m
    blocks = [b for b in m.content if b.type == "tool_use"]
    assert blocks and blocks[0].name == "get_weather" and isinstance(blocks[0].input, dict)


def test_anthropic_errors_are_sdk_exceptions():
    client = ant()
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model=MODEL, max_tokens=0, messages=COUNT)
    assert e.value.status_code == 400
    assert "max_tokens" in str(e.value)
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(
            model=MODEL, max_tokens=5, messages=[{"role": "system", "content": "x"}]
        )
    with pytest.raises(anthropic.AuthenticationError):
        ant(api_key="wrong").messages.create(model=MODEL, max_tokens=5, messages=COUNT)
