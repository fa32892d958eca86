"""The real `gemma4 serve` on a free loopback port, driven by the official `openai` client.

Run by scripts/test.sh:
    GEMMA4_BIN=target/debug/gemma4 GEMMA4_SCRIPTED_BIN=target/debug/examples/scripted_serve \
        pytest conformance/openai_client
The server serves the bundled tiny fixture (random weights: the text is gibberish, so the tests
assert on structure, determinism, usage counts and parsing, not on meaning). Thinking and tool
calls, which such a model never emits, come from the same server over the scripted test model
(`server/examples/scripted_serve.rs`, a test build only).
"""

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

from typing import List, Literal

import openai
import pydantic
import pytest

KEY = "sk-test-gemma4"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The scripted test model answers every request with this (thinking, then a tool call).
SCRIPT = ('<|channel>thought\nI should look up the weather.<channel|>'
          '<|tool_call>call:get_weather{city:<|"|>Paris, France<|"|>,days:2,units:{temp:<|"|>C<|"|>}}<tool_call|><|tool_response>')
# The tool the script calls, declared with the arguments it passes: calls follow the declared
# schema (a grammar), so the declaration must allow them.
WEATHER_PARAMETERS = {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"},
    "units": {"type": "object", "properties": {"temp": {"type": "string"}}}}, "required": ["city"]}
WEATHER_TOOL = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                 "parameters": WEATHER_PARAMETERS}}]


def start(extra, command=None, max_model_len=512):
    """`gemma4 serve` with `extra` flags, or `command` (a server taking the same flags) instead."""
    command = command or [os.environ.get("GEMMA4_BIN", os.path.join(ROOT, "target", "debug", "gemma4")), "serve"]
    port = free_port()
    proc = subprocess.Popen(
        [*command, "--port", str(port), "--served-model-name", "tiny", "--max-model-len", str(max_model_len),
         *extra],
        env={**os.environ, "GEMMA4_API_KEY": KEY},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except Exception:
            if proc.poll() is not None:
                raise RuntimeError("server exited: " + proc.stderr.read().decode())
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("server did not become healthy")
    return proc, base


def stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server():
    proc, base = start([])
    yield base
    stop(proc)


@pytest.fixture(scope="module")
def scripted():
    binary = os.environ.get("GEMMA4_SCRIPTED_BIN", os.path.join(ROOT, "target", "debug", "examples", "scripted_serve"))
    proc, base = start(["--scripted-output", SCRIPT], command=[binary])
    yield openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)
    stop(proc)


@pytest.fixture(scope="module")
def vision():
    """The vision fixture (a tiny random model with a vision tower), refusing image URLs."""
    proc, base = start(["--model", os.path.join(ROOT, "fixtures", "tiny-vision"), "--no-image-urls"])
    yield openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)
    stop(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_models(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny"]


def test_chat_completion(client):
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
        max_tokens=8, temperature=0,
    )
    c = r.choices[0]
    assert r.object == "chat.completion"
    assert c.message.role == "assistant"
    assert isinstance(c.message.content, str)
    # Greedy on the random fixture never samples an end-of-turn within 8 tokens.
    assert c.finish_reason == "length"
    assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = client.chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
        max_tokens=8, temperature=0,
    )
    assert again.choices[0].message.content == c.message.content


def test_chat_streaming_matches_non_streaming(client):
    msgs = [{"role": "user", "content": "Tell me a story"}]
    whole = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0)
    stream = client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    text, usage, roles = "", None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta.role:
                roles.append(ch.delta.role)
            text += ch.delta.content or ""
    assert roles == ["assistant"]
    assert text == (whole.choices[0].message.content or "")
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_thinking_on_reports_reasoning_fields(client):
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Think first"}], max_tokens=8, temperature=0,
        reasoning_effort="high",
    )
    msg = r.choices[0].message.model_dump()
    # Both spellings are always present; this random model never opens a thought channel, so
    # the thinking is empty and counts no tokens (the scripted tests below cover a real one).
    assert "reasoning" in msg and "reasoning_content" in msg
    assert msg["reasoning"] is None and msg["reasoning_content"] is None
    details = r.usage.completion_tokens_details
    assert details is not None and details.reasoning_tokens == 0


def test_tool_declaration_is_accepted(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools, max_tokens=8, temperature=0,
    )
    assert r.choices[0].finish_reason == "length"


def test_tool_results_round_trip(client):
    # A conversation carrying a tool call and its result renders and runs.
    msgs = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temp_c": 21})},
    ]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0)
    assert r.usage.prompt_tokens > 10


def test_prefix_cache_reports_cached_tokens(client):
    # A conversation's second turn resends the first: the server reuses its KV blocks (16 tokens
    # each) and says so in the usage, streaming included.
    system = "You are a careful assistant who answers in short sentences. " * 4
    first = [{"role": "system", "content": system}, {"role": "user", "content": "Hello!"}]
    a = client.chat.completions.create(model="tiny", messages=first, max_tokens=6, temperature=0)
    second = first + [{"role": "assistant", "content": a.choices[0].message.content},
                      {"role": "user", "content": "And then?"}]
    b = client.chat.completions.create(model="tiny", messages=second, max_tokens=6, temperature=0)
    cached = b.usage.prompt_tokens_details.cached_tokens
    assert cached >= 32 and cached % 16 == 0 and cached < b.usage.prompt_tokens
    chunks = list(client.chat.completions.create(
        model="tiny", messages=second, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert usage.prompt_tokens_details.cached_tokens >= cached
    r = client.responses.create(model="tiny", input="Hello!", instructions=system, max_output_tokens=4, temperature=0)
    again = client.responses.create(model="tiny", input="Hello!", instructions=system, max_output_tokens=4,
                                    temperature=0)
    assert again.usage.input_tokens_details.cached_tokens >= 32
    assert again.output_text == r.output_text


class Address(pydantic.BaseModel):
    zip: int = pydantic.Field(ge=1000, le=9999)
    ok: bool


class Person(pydantic.BaseModel):
    # Bounded, so that the random-weight model always finishes within max_tokens.
    name: str = pydantic.Field(max_length=8)
    age: int = pydantic.Field(ge=0, le=120)
    tags: List[Literal["red", "green", "blue"]] = pydantic.Field(max_length=3)
    address: Address


def test_structured_outputs_parse(client):
    # The openai client's parse(): a strict JSON schema from a pydantic model (nested: $defs and
    # $ref), answers validated by pydantic. Temperature 1 on random weights: only enforcement
    # makes them parse.
    msgs = [{"role": "user", "content": "Describe a person."}]
    for seed in range(20):
        r = client.chat.completions.parse(model="tiny", messages=msgs, response_format=Person, temperature=1.0,
                                          seed=seed, max_tokens=160)
        assert r.choices[0].finish_reason == "stop"
        assert isinstance(r.choices[0].message.parsed, Person)
    with client.chat.completions.stream(model="tiny", messages=msgs, response_format=Person, temperature=1.0,
                                        seed=3, max_tokens=160) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, Person)
    # The Responses API's text.format.
    r = client.responses.parse(model="tiny", input="Describe a person.", text_format=Person, temperature=1.0,
                               max_output_tokens=160)
    assert isinstance(r.output_parsed, Person)
    # A format the server cannot compile is a 400.
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4,
                                       response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})


def test_responses(client):
    r = client.responses.create(model="tiny", input="Say hi", instructions="Be brief", max_output_tokens=6, temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert isinstance(r.output_text, str)
    assert r.usage.output_tokens == 6


def test_responses_streaming(client):
    events = list(client.responses.create(
        model="tiny", input=[{"role": "user", "content": "Say hi"}], max_output_tokens=5, temperature=0, stream=True))
    types = [e.type for e in events]
    assert types[0] == "response.created"
    assert types[-1] == "response.incomplete"
    final = events[-1].response
    assert final.usage.output_tokens == 5
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    message = [o for o in final.output if o.type == "message"]
    assert message and message[0].content[0].text == text
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_auth_failure(server):
    bad = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[], max_tokens=4)
    assert "messages" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x " * 2000}], max_tokens=4)
    assert "maximum context length is 512" in str(e.value)


def image_url(name):
    with open(os.path.join(ROOT, "fixtures", "tiny-vision", "images", name), "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def test_image_chat(vision):
    parts = [{"type": "text", "text": "What is in this picture?"},
             {"type": "image_url", "image_url": {"url": image_url("noise_square.png")}}]
    r = vision.chat.completions.create(model="tiny", messages=[{"role": "user", "content": parts}], max_tokens=6, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert isinstance(r.choices[0].message.content, str)
    text_only = vision.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "What is in this picture?"}], max_tokens=1, temperature=0)
    # 64 soft tokens (48x48 upscaled to 384x384 at the fixture's budget of 70) plus <|image> and <image|>
    assert r.usage.prompt_tokens == text_only.usage.prompt_tokens + 64 + 2
    stream = vision.chat.completions.create(model="tiny", messages=[{"role": "user", "content": parts}], max_tokens=6,
                                            temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == r.choices[0].message.content
    # A larger budget gives more soft tokens.
    big = vision.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [parts[1]]}], max_tokens=1,
                                         extra_body={"mm_processor_kwargs": {"max_soft_tokens": 140}})
    small = vision.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [parts[1]]}], max_tokens=1)
    assert big.usage.prompt_tokens >= small.usage.prompt_tokens


def test_image_errors(vision, client):
    bad = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}]
    with pytest.raises(openai.BadRequestError) as e:
        vision.chat.completions.create(model="tiny", messages=[{"role": "user", "content": bad}], max_tokens=2)
    assert "messages[0].content[0]" in str(e.value)
    remote = [{"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}}]
    with pytest.raises(openai.BadRequestError) as e:
        vision.chat.completions.create(model="tiny", messages=[{"role": "user", "content": remote}], max_tokens=2)
    assert "--no-image-urls" in str(e.value)
    # The text-only fixture has no vision tower.
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url("noise_square.png")}}]}], max_tokens=2)
    assert "vision tower" in str(e.value)


def test_responses_input_image(vision):
    r = vision.responses.create(model="tiny", input=[{"role": "user", "content": [
        {"type": "input_text", "text": "Describe it"}, {"type": "input_image", "image_url": image_url("gradient_tall.png")}]}],
        max_output_tokens=4, temperature=0)
    assert r.status == "incomplete"
    assert r.usage.input_tokens > 64


def test_unknown_model(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}], max_tokens=2)


def test_tool_call_and_thinking(scripted):
    r = scripted.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=WEATHER_TOOL, reasoning_effort="medium")
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    msg = c.message.model_dump()
    assert msg["reasoning"] == msg["reasoning_content"] == "I should look up the weather."
    assert not c.message.content
    [call] = c.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris, France", "days": 2, "units": {"temp": "C"}}
    # The thought block, `<|channel>` to `<channel|>`, is 25 tokens of the fixture's tokenizer.
    assert r.usage.completion_tokens_details.reasoning_tokens == 25


def test_tool_choice_none_makes_no_call(scripted):
    # The scripted model would call the tool; with tool_choice "none" (or no tools) it cannot
    # open a call, so none comes back.
    for extra in ({"tools": WEATHER_TOOL, "tool_choice": "none"}, {}):
        r = scripted.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Weather in Paris?"}], max_tokens=40, **extra)
        c = r.choices[0]
        assert not c.message.tool_calls and c.finish_reason != "tool_calls"


def test_tool_call_streaming_chunks_are_complete(scripted):
    stream = scripted.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=WEATHER_TOOL, stream=True)
    reasoning, calls, finish = "", [], None
    for chunk in stream:
        for ch in chunk.choices:
            d = ch.delta.model_dump()
            reasoning += d.get("reasoning") or ""
            for tc in ch.delta.tool_calls or []:
                # Every tool-call chunk carries index, id, type and name.
                assert tc.index == 0 and tc.id and tc.type == "function" and tc.function.name == "get_weather"
                calls.append(tc.function.arguments)
            finish = ch.finish_reason or finish
    assert reasoning == "I should look up the weather."
    assert json.loads("".join(calls)) == {"city": "Paris, France", "days": 2, "units": {"temp": "C"}}
    assert finish == "tool_calls"
    # No special token text leaks.
    assert "<|" not in reasoning and "|>" not in "".join(calls)


def test_responses_function_call_and_reasoning(scripted):
    tools = [{"type": "function", "name": "get_weather", "parameters": WEATHER_PARAMETERS}]
    r = scripted.responses.create(model="tiny", input="Weather in Paris?", tools=tools, reasoning={"effort": "low"})
    kinds = [o.type for o in r.output]
    assert kinds == ["reasoning", "function_call"]
    call = r.output[1]
    assert call.name == "get_weather" and json.loads(call.arguments)["city"] == "Paris, France"
    events = list(scripted.responses.create(model="tiny", input="Weather?", tools=tools, stream=True))
    types = [e.type for e in events]
    assert "response.reasoning_text.delta" in types and "response.function_call_arguments.done" in types
    assert types[-1] == "response.completed"


# Legacy completions (`/v1/completions`), as lm-eval and other harnesses call them.

def test_completions_prompt_forms(client):
    text = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0)
    assert text.object == "text_completion" and text.id.startswith("cmpl-")
    [c] = text.choices
    assert c.index == 0 and c.finish_reason == "length" and c.logprobs is None
    assert text.usage.completion_tokens == 8
    assert text.usage.total_tokens == text.usage.prompt_tokens + 8
    # The same prompt as token ids (the tokenizer's, <bos> first) gives the same text.
    ids = json.loads(urllib.request.urlopen(urllib.request.Request(
        str(client.base_url).replace("/v1/", "/tokenize"), data=json.dumps({"prompt": "Once upon a time"}).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})).read())["tokens"]
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == c.text
    # A list of strings, and a list of token id lists, with n: index = prompt × n + j.
    for prompt in (["Once upon a time", "Hello"], [ids, ids[:3]]):
        many = client.completions.create(model="tiny", prompt=prompt, n=2, max_tokens=4, temperature=0)
        assert [ch.index for ch in many.choices] == [0, 1, 2, 3]
        assert many.choices[0].text == many.choices[1].text == c.text[:len(many.choices[0].text)]
        assert many.usage.completion_tokens == 16


def test_completions_echo_and_logprobs(client):
    plain = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0)
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0,
                                  echo=True, logprobs=2)
    c = r.choices[0]
    assert c.text == "Once upon a time" + plain.choices[0].text
    lp = c.logprobs
    # The prompt's tokens (the first without a logprob) and then the 6 generated ones.
    n = r.usage.prompt_tokens + 6
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert all(1 <= len(t) <= 3 for t in lp.top_logprobs[1:])
    # lm-eval's loglikelihood request: the prompt alone, with its logprobs.
    ll = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=0, echo=True, logprobs=1)
    assert ll.choices[0].text == "Once upon a time" and ll.usage.completion_tokens == 0
    assert ll.choices[0].logprobs.token_logprobs[0] is None
    assert len(ll.choices[0].logprobs.tokens) == ll.usage.prompt_tokens


def test_completions_streaming_with_usage(client):
    whole = client.completions.create(model="tiny", prompt=["Once upon a time", "Hello"], n=2, max_tokens=8,
                                      temperature=0)
    stream = client.completions.create(model="tiny", prompt=["Once upon a time", "Hello"], n=2, max_tokens=8,
                                       temperature=0, stream=True, stream_options={"include_usage": True})
    texts, finish, usage = {}, {}, None
    for chunk in stream:
        assert chunk.object == "text_completion"
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
        for ch in chunk.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
            finish[ch.index] = ch.finish_reason or finish.get(ch.index)
    assert texts == {ch.index: ch.text for ch in whole.choices}
    assert finish == {i: "length" for i in range(4)}
    assert usage is not None and usage.model_dump() == whole.usage.model_dump()


def test_completions_bad_requests(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="Once upon a time", suffix="The end.", max_tokens=4)
    assert e.value.body["param"] == "suffix"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hi", logprobs=21, max_tokens=4)
    assert e.value.body["param"] == "logprobs"


def test_completions_text_is_not_parsed(scripted):
    # A completion is the plain text: the thinking and the tool call of the script are not
    # split out, only the special tokens are dropped.
    r = scripted.completions.create(model="tiny", prompt="Weather in Paris?", max_tokens=100)
    text = r.choices[0].text
    assert text.startswith("thought\nI should look up the weather.call:get_weather{")
    assert "<|" not in text and "|>" not in text


def test_stored_responses(client):
    r = client.responses.create(model="tiny", input="Say hi", instructions="Be brief", max_output_tokens=6, temperature=0)
    assert r.store is True and r.previous_response_id is None
    assert client.responses.retrieve(r.id).model_dump() == r.model_dump()
    # A continuation's prompt holds the earlier turn.
    nxt = client.responses.create(model="tiny", input="And again?", previous_response_id=r.id, max_output_tokens=6, temperature=0)
    alone = client.responses.create(model="tiny", input="And again?", max_output_tokens=6, temperature=0)
    assert nxt.previous_response_id == r.id
    assert nxt.usage.input_tokens > alone.usage.input_tokens
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.retrieve(r.id)
    assert e.value.param == "response_id" and r.id in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model="tiny", input="x", previous_response_id=r.id)
    assert e.value.param == "previous_response_id"
    unkept = client.responses.create(model="tiny", input="Say hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unkept.id)


def test_responses_function_call_continuation(scripted):
    tools = [{"type": "function", "name": "get_weather", "parameters": WEATHER_PARAMETERS}]
    r = scripted.responses.create(model="tiny", input="Weather in Paris?", tools=tools)
    [call] = [o for o in r.output if o.type == "function_call"]
    result = [{"type": "function_call_output", "call_id": call.call_id, "output": json.dumps({"temp": 21})}]
    nxt = scripted.responses.create(model="tiny", input=result, previous_response_id=r.id, tools=tools)
    assert nxt.status == "completed" and nxt.previous_response_id == r.id
    assert nxt.usage.input_tokens > r.usage.input_tokens
    # Without the stored call, the result answers no call: a 400.
    with pytest.raises(openai.BadRequestError):
        scripted.responses.create(model="tiny", input=result, tools=tools)


# Robustness: schemathesis generates requests from /openapi.json (valid ones, and invalid ones of
# every kind) against the real server.

def test_schemathesis_finds_no_5xx_and_no_schema_violation(tmp_path):
    """Every operation of /openapi.json, a bounded number of generated cases each (fixed seed, so
    CI reruns the same cases): no answer may be a 5xx, and every answer must match the schema
    the server documents for its status. A short context keeps generated generations short."""
    proc, base = start([], max_model_len=48)
    try:
        st = os.path.join(os.path.dirname(sys.executable), "schemathesis")
        run = subprocess.run(
            [st, "run", base + "/openapi.json", "--header", f"Authorization: Bearer {KEY}",
             "--checks", "not_a_server_error,response_schema_conformance",
             "--phases", "examples,coverage,fuzzing", "--max-examples", "40", "--seed", "1",
             "--request-timeout", "120", "--workers", "2"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path)  # its cache stays out of the repo
        summary = run.stdout[-3000:]
        print(summary)
        assert run.returncode == 0, summary + run.stderr[-2000:]
        assert "generated" in summary
    finally:
        stop(proc)
