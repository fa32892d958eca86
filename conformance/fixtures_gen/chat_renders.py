"""Reference chat-template renders for the Rust renderer (server/src/chat_template.rs).

Writes <repo>/fixtures/chat/cases.json (run through run.sh, or directly with the fixtures venv:
`python conformance/fixtures_gen/chat_renders.py`). Deterministic: no clock, no randomness.

1. `cases`: conversations as an OpenAI client sends them (`openai_messages`: tool results as
   `role: "tool"` messages with `tool_call_id`, `arguments` as JSON strings, reasoning as
   `reasoning_content` or `reasoning`), converted here by hand into what the template reads
   (`template_messages`), rendered by transformers' `apply_chat_template(..., tokenize=False)` with
   the fixture tokenizer (`expected`), and tokenized (`expected_ids`, no special tokens added).

   `tool_results` is "attach" for every case (the server's rule): the fixture template, like Google's Gemma 4
   template, reads tool results only from `tool_responses` and ignores `role: "tool"` messages, so
   each run of tool messages becomes `tool_responses: [{name, response}]` on the assistant message
   that made the calls, and the tool messages are dropped. The call's name is looked up by
   `tool_call_id` among that assistant message's `tool_calls`; tool content given as text parts is
   joined with "\\n", then parsed as JSON when it parses; `function.arguments` given as a JSON string
   is parsed (an empty string is {}); `reasoning` becomes `reasoning_content`; role `developer`
   becomes `system`. (The old "keep" style, tool messages kept as they are, is no longer recorded:
   the fixture template would render those conversations without their results.)

2. `feature_templates`: small templates exercising the Jinja features chat templates in the wild use
   (the server's rule), rendered by the same transformers path, so the Rust environment can be checked
   feature by feature against Jinja2 as transformers configures it. `expected_error` (instead of
   `expected`) holds the message of the exception transformers raised. Jinja2 and Python behaviour
   that no published template relies on and the renderer does not emulate (Python's whitespace and
   the str methods minijinja-contrib's pycompat lacks, `int('abc')`, `is sequence` on strings, ...)
   is left out here; the Rust test `known_divergences_from_jinja2` pins it.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import sys

import jinja2
import tokenizers
import transformers
from transformers import AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
FIXTURE = "fixtures/tiny-31b-recipe"
OUT = "fixtures/chat/cases.json"
SCRIPT = "conformance/fixtures_gen/chat_renders.py"

IMAGE_URL = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAwS2OUAAAAABJRU5ErkJggg=="

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "description": "Forecast days", "minimum": 1, "maximum": 7},
            },
            "required": ["city"],
        },
    },
}

SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search_flights",
        "description": "Search flights between airports.",
        "parameters": {
            "type": "object",
            "properties": {
                "route": {
                    "type": "object",
                    "description": "Where from and to",
                    "properties": {
                        "from": {"type": "string", "pattern": "^[A-Z]{3}$"},
                        "to": {"type": "string"},
                    },
                    "required": ["from", "to"],
                },
                "passengers": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string"},
                            "age": {"type": "number"},
                            "class": {"type": "string", "enum": ["economy", "business", "first"]},
                        },
                    },
                },
                "flexible": {"type": "boolean", "default": False},
                "max_price": {"type": ["number", "null"]},
            },
            "required": ["route"],
        },
    },
}

NO_PARAMS_TOOL = {"type": "function", "function": {"name": "get_time", "description": "The current time (UTC)."}}


def call(id_: str, name: str, args: dict | str) -> dict:
    return {
        "id": id_,
        "type": "function",
        "function": {"name": name, "arguments": args if isinstance(args, str) else json.dumps(args)},
    }


# ---------------------------------------------------------------------------------------------
# OpenAI messages -> template-native messages, written out by hand from the server's rule (server/src/openai/messages.rs).


def _join_text(content):
    if isinstance(content, list):
        return "\n".join(p["text"] if isinstance(p, dict) else str(p) for p in content
                         if not isinstance(p, dict) or p.get("type") == "text")
    return content


def _parse_json_or_keep(text):
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _convert_assistant(msg: dict) -> dict:
    out = {}
    for k, v in msg.items():
        if k == "reasoning":
            continue
        if k == "tool_calls" and v:
            calls = []
            for c in v:
                c = copy.deepcopy(c)
                f = c.get("function", c)
                a = f.get("arguments")
                if isinstance(a, str):
                    f["arguments"] = {} if a.strip() == "" else _parse_json_or_keep(a)
                    if not isinstance(f["arguments"], dict):
                        f["arguments"] = a
                calls.append(c)
            v = calls
        out[k] = v
    if out.get("reasoning_content") is None and msg.get("reasoning") is not None:
        out["reasoning_content"] = msg["reasoning"]
    return out


def to_template_messages(messages: list[dict]) -> list[dict]:
    out: list[dict] = []
    last_assistant = None  # index in `out` of the assistant message that made the calls
    run_pos = 0  # position of the tool message in its run
    for i, msg in enumerate(messages):
        role = msg["role"]
        if role == "tool":
            if last_assistant is None:
                raise ValueError(f"message {i}: tool message without a preceding assistant tool call")
            calls = out[last_assistant]["tool_calls"]
            tid = msg.get("tool_call_id")
            if tid is not None:
                names = [c["function"]["name"] for c in calls if c.get("id") == tid]
                if not names:
                    raise ValueError(f"message {i}: unknown tool_call_id {tid!r}")
                name = names[0]
            elif msg.get("name"):
                name = msg["name"]
            else:
                name = calls[run_pos]["function"]["name"]
            run_pos += 1
            response = _parse_json_or_keep(_join_text(msg.get("content") or ""))
            out[last_assistant].setdefault("tool_responses", []).append({"name": name, "response": response})
            continue
        run_pos = 0
        if role == "developer":
            msg = {**msg, "role": "system"}
        if role == "assistant":
            msg = _convert_assistant(msg)
            last_assistant = len(out) if msg.get("tool_calls") else None
        else:
            msg = copy.deepcopy(msg)
            last_assistant = None
        out.append(msg)
    return out


# ---------------------------------------------------------------------------------------------
# Conversations.

SYSTEM = {"role": "system", "content": "You are a concise assistant."}

CASES = [
    dict(name="system_user", messages=[SYSTEM, {"role": "user", "content": "What is the capital of France?"}]),
    dict(
        name="user_only_no_generation_prompt",
        messages=[{"role": "user", "content": "Hello there"}],
        add_generation_prompt=False,
    ),
    dict(
        name="multi_turn",
        messages=[
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Count to three."},
            {"role": "assistant", "content": "One, two, three."},
            {"role": "user", "content": "  Now backwards, please.  \n"},
        ],
    ),
    dict(
        name="ends_with_assistant",
        messages=[
            SYSTEM,
            {"role": "user", "content": "Say yes."},
            {"role": "assistant", "content": "Yes."},
        ],
        add_generation_prompt=False,
    ),
    dict(
        name="developer_role",
        messages=[
            {"role": "developer", "content": "Answer in French."},
            {"role": "user", "content": "Good morning"},
        ],
    ),
    dict(
        name="thinking_on",
        messages=[SYSTEM, {"role": "user", "content": "Why is the sky blue?"}],
        kwargs={"enable_thinking": True},
    ),
    dict(
        name="thinking_on_no_system",
        messages=[{"role": "user", "content": "Think about 2+2."}],
        kwargs={"enable_thinking": True},
    ),
    dict(
        name="thinking_off",
        messages=[{"role": "user", "content": "Why is the sky blue?"}],
        kwargs={"enable_thinking": False},
    ),
    dict(
        name="tools_declared",
        messages=[SYSTEM, {"role": "user", "content": "Weather in Paris and flights to Rome?"}],
        tools=[WEATHER_TOOL, SEARCH_TOOL, NO_PARAMS_TOOL],
    ),
    dict(
        name="tools_declared_thinking",
        messages=[{"role": "user", "content": "What time is it?"}],
        tools=[NO_PARAMS_TOOL],
        kwargs={"enable_thinking": True},
    ),
    dict(
        name="tool_call_one_result",
        messages=[
            SYSTEM,
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [call("call_1", "get_weather", {"city": "Paris", "unit": "celsius", "days": 2})],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temp": 21.5, "sky": "clear", "rain": False, "alerts": None, "hourly": [20, 21, 23]})},
            {"role": "assistant", "content": "It is 21.5 °C and clear in Paris."},
            {"role": "user", "content": "Thanks!"},
        ],
        tools=[WEATHER_TOOL],
        # The result right after the call, the answer continuing the same model turn.
        expected_contains="<|turn>model\n<|tool_call>call:get_weather{city:<|\"|>Paris<|\"|>,days:2,unit:<|\"|>celsius<|\"|>}<tool_call|>"
        "<|tool_response>response:get_weather{alerts:null,hourly:[20,21,23],rain:false,sky:<|\"|>clear<|\"|>,temp:21.5}<tool_response|>"
        "It is 21.5 °C and clear in Paris.<turn|>\n<|turn>user\nThanks!<turn|>\n<|turn>model\n",
    ),
    dict(
        name="tool_call_two_results",
        messages=[
            {"role": "user", "content": "Weather in Paris, and flights CDG to FCO for two?"},
            {
                "role": "assistant",
                "content": "Let me check both.",
                "tool_calls": [
                    call("call_a", "get_weather", {"city": "Paris"}),
                    call("call_b", "search_flights", {
                        "route": {"from": "CDG", "to": "FCO"},
                        "passengers": [{"name": "Ann", "age": 34}, {"name": "Bo", "age": 7.5, "class": "economy"}],
                        "flexible": True,
                        "max_price": None,
                    }),
                ],
            },
            {"role": "tool", "tool_call_id": "call_a", "content": json.dumps({"temp": 18, "sky": "rain"})},
            {"role": "tool", "tool_call_id": "call_b", "content": "No flights found: the airport is closed."},
        ],
        tools=[WEATHER_TOOL, SEARCH_TOOL],
        # Ends inside the open model turn: no new <|turn>model, the empty thought channel (thinking off).
        expected_ends="<tool_call|><|tool_response>response:get_weather{sky:<|\"|>rain<|\"|>,temp:18}<tool_response|>"
        "<|tool_response>response:search_flights{value:<|\"|>No flights found: the airport is closed.<|\"|>}<tool_response|>"
        "<|channel>thought\n<channel|>",
    ),
    dict(
        name="tool_result_generation_thinking",
        messages=[
            {"role": "user", "content": "What time is it?"},
            {"role": "assistant", "content": None, "tool_calls": [call("c1", "get_time", {})]},
            {"role": "tool", "tool_call_id": "c1", "content": json.dumps({"utc": "12:00", "ok": True})},
        ],
        tools=[NO_PARAMS_TOOL],
        kwargs={"enable_thinking": True},
        # Thinking on: the generation prompt adds nothing; the model continues the open turn.
        expected_ends="<turn|>\n<|turn>model\n<|tool_call>call:get_time{}<tool_call|>"
        "<|tool_response>response:get_time{ok:true,utc:<|\"|>12:00<|\"|>}<tool_response|>",
    ),
    dict(
        name="tool_calls_two_rounds",
        messages=[
            {"role": "user", "content": "Warmer: Paris or Rome?"},
            {"role": "assistant", "content": "First Paris.", "tool_calls": [call("r1", "get_weather", {"city": "Paris"})]},
            {"role": "tool", "tool_call_id": "r1", "content": json.dumps({"temp": 18})},
            {"role": "assistant", "content": "Now Rome.", "tool_calls": [call("r2", "get_weather", {"city": "Rome"})]},
            {"role": "tool", "tool_call_id": "r2", "content": json.dumps({"temp": 24})},
            {"role": "assistant", "content": "Rome (24) is warmer than Paris (18)."},
            {"role": "user", "content": "And Oslo?"},
        ],
        tools=[WEATHER_TOOL],
        # Both rounds and the answer in one model turn.
        expected_contains="<|turn>model\nFirst Paris.<|tool_call>call:get_weather{city:<|\"|>Paris<|\"|>}<tool_call|>"
        "<|tool_response>response:get_weather{temp:18}<tool_response|>Now Rome.<|tool_call>call:get_weather{city:<|\"|>Rome<|\"|>}<tool_call|>"
        "<|tool_response>response:get_weather{temp:24}<tool_response|>Rome (24) is warmer than Paris (18).<turn|>\n<|turn>user\nAnd Oslo?<turn|>\n",
    ),
    dict(
        name="tool_result_then_user",
        messages=[
            {"role": "user", "content": "Time?"},
            {"role": "assistant", "content": "", "tool_calls": [call("t", "get_time", "{}")]},
            {"role": "tool", "tool_call_id": "t", "content": "clock unavailable"},
            {"role": "user", "content": "Never mind."},
        ],
        tools=[NO_PARAMS_TOOL],
        # A user message closes the open model turn; a non-JSON result is kept as a string.
        expected_contains="<|tool_call>call:get_time{}<tool_call|><|tool_response>response:get_time{value:<|\"|>clock unavailable<|\"|>}<tool_response|>"
        "<turn|>\n<|turn>user\nNever mind.<turn|>\n<|turn>model\n<|channel>thought\n<channel|>",
    ),
    dict(
        name="tool_results_out_of_order_and_parts",
        messages=[
            {"role": "user", "content": "Two cities."},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [call("w1", "get_weather", {"city": "Oslo"}), call("w2", "get_weather", "{\"city\": \"Lima\"}"),
                               call("t1", "get_time", "")],
            },
            {"role": "tool", "tool_call_id": "w2", "content": [{"type": "text", "text": "{\"temp\": 25,"}, {"type": "text", "text": "\"sky\": \"sun\"}"}]},
            {"role": "tool", "tool_call_id": "w1", "content": "  -3  "},
            {"role": "tool", "tool_call_id": "t1", "content": "12:00 UTC"},
            {"role": "assistant", "content": "Oslo -3, Lima 25 and sunny; it is noon."},
        ],
        tools=[WEATHER_TOOL, NO_PARAMS_TOOL],
        add_generation_prompt=False,
        # Results in the order they came, named through tool_call_id.
        expected_ends="<|tool_response>response:get_weather{sky:<|\"|>sun<|\"|>,temp:25}<tool_response|>"
        "<|tool_response>response:get_weather{value:-3}<tool_response|>"
        "<|tool_response>response:get_time{value:<|\"|>12:00 UTC<|\"|>}<tool_response|>"
        "Oslo -3, Lima 25 and sunny; it is noon.<turn|>\n",
    ),
    dict(
        name="reasoning_sent_back",
        messages=[
            {"role": "user", "content": "What is 17*3?"},
            {"role": "assistant", "content": "51", "reasoning_content": "17*3 = 51."},
            {"role": "user", "content": "And 17*4?"},
            {"role": "assistant", "content": "68", "reasoning": "17*4 = 68."},
            {"role": "user", "content": "Thanks"},
        ],
        kwargs={"enable_thinking": True},
    ),
    dict(
        name="image_part",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this picture?"},
                    {"type": "image_url", "image_url": {"url": IMAGE_URL}},
                    {"type": "text", "text": " Answer briefly."},
                ],
            }
        ],
    ),
    dict(
        name="content_text_parts",
        messages=[
            {"role": "system", "content": [{"type": "text", "text": "Be brief. "}, {"type": "text", "text": "Be kind."}]},
            {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": ", world"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Hi."}]},
            {"role": "user", "content": [{"type": "text", "text": "Again"}]},
        ],
    ),
    dict(
        name="empty_system",
        messages=[{"role": "system", "content": ""}, {"role": "user", "content": "Hello"}],
    ),
    dict(
        name="unicode",
        messages=[
            {"role": "system", "content": "Réponds en français — poliment. 日本語も可。"},
            {"role": "user", "content": "Ünïcödé: 你好, мир, مرحبا, 🙂👍🏽, e\u0301, tab\there, \"quotes\" and 'apostrophes' \\ backslash"},
            {"role": "assistant", "content": "D’accord ! 🎉"},
            {"role": "user", "content": "<b>markup</b> & {{ not jinja }} {% raw %}"},
        ],
    ),
]


# ---------------------------------------------------------------------------------------------
# Feature templates (Jinja features used by chat templates in the wild).

# Keys are written in sorted order: minijinja's maps (and serde_json's, which the server parses
# requests with) are sorted unless their `preserve_order` features are on, so insertion order is
# only checked by the `dict_order` feature (marked `needs_preserve_order`).
FEATURE_MESSAGES = [
    {"content": "  sys text  ", "role": "system"},
    {"content": "Hello, World: a,b,,c", "role": "user"},
    {"content": "Hi", "role": "assistant", "tool_calls": [{"function": {"arguments": {"A": [1, 2.5, None, True], "b": 2, "c": "x"}, "name": "f"}}]},
    {"content": [{"text": "part one", "type": "text"}, {"type": "image"}], "role": "user"},
]

FEATURES = [
    dict(
        name="macros_recursion",
        template=(
            "{%- macro render(v, depth=0, sep=', ') -%}\n"
            "{%- if v is mapping -%}{{ '{' }}{%- for k, x in v | dictsort -%}{{ k }}={{ render(x, depth + 1, sep=sep) }}"
            "{%- if not loop.last %}{{ sep }}{% endif -%}{%- endfor -%}{{ '}' }}\n"
            "{%- elif v is string -%}'{{ v }}'\n"
            "{%- elif v is sequence -%}[{%- for x in v -%}{{ render(x, depth + 1) }}{{ ';' if not loop.last }}{%- endfor -%}]\n"
            "{%- else -%}{{ v }}@{{ depth }}\n"
            "{%- endif -%}\n"
            "{%- endmacro -%}\n"
            "{%- macro greet(name, greeting='Hello', punct='!') -%}{{ greeting }}, {{ name }}{{ punct }}{%- endmacro -%}\n"
            "{{ greet('Ann') }} {{ greet('Bo', punct='?') }} {{ greet(greeting='Hey', name='Cy') }}\n"
            "{{ render(messages[2].tool_calls[0].function.arguments) }}\n"
            "{{ render(messages[2]['tool_calls'][0]['function']['arguments'], sep=' | ') }}\n"
            "{{ render([1, [2, [3, 'x']], {'k': none}]) }}\n"
            "{%- macro wrap() -%}<{{ caller() }}>{%- endmacro %}\n"
            "{% call wrap() %}called {{ 1 + 1 }}{% endcall %}\n"
        ),
    ),
    dict(
        name="namespace_and_loops",
        template=(
            "{%- set ns = namespace(count=0, last_user=-1, names=[]) -%}\n"
            "{%- for m in messages -%}\n"
            "{%- set ns.count = ns.count + 1 -%}\n"
            "{%- if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif -%}\n"
            "{%- set ns.names = ns.names + [m.role] -%}\n"
            "{{ loop.index0 }}/{{ loop.index }}/{{ loop.length }}:{{ m.role }}{{ ' first' if loop.first }}{{ ' last' if loop.last }}\n"
            "{% endfor -%}\n"
            "count={{ ns.count }} last_user={{ ns.last_user }} names={{ ns.names | join(',') }}\n"
            "{%- for m in messages %}{% if m.role == 'assistant' %}{% continue %}{% endif %}{% if loop.index > 3 %}{% break %}{% endif %}[{{ m.role }}]{% endfor %}\n"
            "{% for m in messages if m.role != 'system' %}{{ loop.index }}{{ m.role[0] }}{% else %}none{% endfor %}\n"
            "{% for x in [] %}x{% else %}empty{% endfor %}\n"
            "{% for k, v in {'a': 2, 'b': 1}.items() %}{{ k }}{{ v }}{% endfor %}\n"
            "{% for i in range(3) %}{{ i }}{{ loop.cycle('a', 'b') }}{% endfor %}\n"
            "{%- set outer = 'o' %}{% for i in [1] %}{% set outer = 'inner' %}{% endfor %} outer={{ outer }}\n"
            "{%- if true %}{% set leaked = 'yes' %}{% endif %} leaked={{ leaked }}\n"
        ),
    ),
    dict(
        name="filters",
        template=(
            "{{ messages[0].content | trim }}|{{ '\\t x \\n' | trim }}|{{ 'xxhixx' | trim('x') }}\n"
            "{{ 'abc' | upper }} {{ 'ÀÉÎ straße' | upper }} {{ 'MiXed' | lower }} {{ 'hello world' | title }} {{ 'hELLO' | capitalize }}\n"
            "{{ missing | default('dflt') }} {{ none | default('dflt') }} {{ '' | default('dflt') }} {{ '' | default('dflt', true) }}\n"
            "{{ ['a', 'b'] | map('upper') | list }} {{ messages | map(attribute='role') | join('+') }} {{ messages | map(attribute='role') | list | length }}\n"
            "{{ messages | selectattr('role', 'equalto', 'user') | list | length }} {{ messages | rejectattr('role', 'eq', 'user') | map(attribute='role') | join(',') }}\n"
            "{{ [3, 1, 2] | sort | join(',') }} {{ [3, 1, 2] | sort(reverse=true) | list }} {{ ['b', 'A', 'c'] | sort | list }} {{ [1, 2, 3] | reverse | list }}\n"
            "{{ [1, 2, 3] | first }} {{ [1, 2, 3] | last }} {{ [1, 2, 3] | sum }} {{ [1, 2, 3] | max }} {{ [4, 2, 3] | min }} {{ [1, 1, 2] | unique | list }}\n"
            "{{ {'C': 3, 'a': 2, 'b': 1} | dictsort }} {{ {'a': 2, 'b': 1} | dictsort(reverse=true) }} {{ {'a': 1, 'b': 0} | dictsort(by='value') }} {{ {'B': 1, 'a': 2} | dictsort(case_sensitive=true) }}\n"
            "{{ 'a-b-c' | replace('-', '+') }} {{ '42' | int + 1 }} {{ '2.5' | float }} {{ 2.567 | round(2) }} {{ 7 | string }} {{ true | string }} {{ none | string }}\n"
            "{{ 'abc' | list }} {{ {'x': 1} | list }} {{ 'abc' | length }} {{ {'x': 1, 'y': 2} | length }} {{ ['x', 'y'] | join }}\n"
            "{{ {'k': 'v'} | items | list }} {{ [1, 2, 3, 4, 5] | batch(2) | list }} {{ 'line1\\n  line2' | indent(2) }}\n"
            "{{ 1 | abs }} {{ -3 | abs }} {{ 10 // 3 }} {{ 10 % 3 }} {{ 2 ** 10 }} {{ 7 / 2 }} {{ 4 / 2 }} {{ 3 * 'ab' }}\n"
        ),
    ),
    dict(
        name="tojson",
        template=(
            "{{ messages[2] | tojson }}\n"
            "{{ messages[2].tool_calls | tojson(indent=2) }}\n"
            "{{ {'b': [1, 2.0, 1.5e-7, 1e20, 123456789012345678], 'a': {'é': 'ü', 'q': '\"\\\\/<>&\\'', 'e': {}, 'l': []}} | tojson(sort_keys=true) }}\n"
            "{{ {'ctl': '\\u0001\\u001f\\u007f\\n\\t\\r\\b\\f', 'emoji': '🙂', 'z': 'ü'} | tojson(ensure_ascii=true) }}\n"
            "{{ [1, {'a': none, 'b': true}] | tojson(separators=(',', ':')) }}\n"
            "{{ {'a': [], 'b': {}, 'c': [1]} | tojson(indent=4) }}\n"
            "{{ 'plain \"str\"' | tojson }} {{ 3 | tojson }} {{ none | tojson }} {{ false | tojson }} {{ 2.5 | tojson }}\n"
            "{{ tools | tojson }}\n"
        ),
        tools=[{"function": {"description": "d", "name": "f", "parameters": {"properties": {"x": {"type": "string"}}, "type": "object"}}, "type": "function"}],
    ),
    dict(
        name="tests",
        template=(
            "{%- set values = ['s', '', [1], [], {'a': 1}, {}, true, false, none, 0, 1, 2.5] -%}\n"
            "{%- for v in values -%}\n"
            "{{ loop.index0 }}: map={{ v is mapping }} str={{ v is string }} bool={{ v is boolean }} "
            "none={{ v is none }} num={{ v is number }} int={{ v is integer }} float={{ v is float }} "
            "def={{ v is defined }} true={{ v is true }} false={{ v is false }} truthy={{ 'y' if v else 'n' }}\n"
            "{% endfor -%}\n"
            "undef: def={{ nope is defined }} undef={{ nope is undefined }} none={{ nope is none }} str={{ nope is string }} map={{ nope is mapping }}\n"
            "attr: {{ messages[0].nope is defined }} {{ messages[0]['nope'] is defined }} {{ messages[0].content is defined }} {{ 'role' in messages[0] }} {{ 'x' not in messages[0] }}\n"
            "in: {{ 'ell' in 'hello' }} {{ 2 in [1, 2] }} {{ 'a' is in ['a'] }} {{ 3 is odd }} {{ 4 is even }} {{ 9 is divisibleby 3 }} {{ 'A' is upper }} {{ 'a' is lower }}\n"
            "cmp: {{ 1 == 1.0 }} {{ 'a' < 'b' }} {{ [1, 2] == [1, 2] }} {{ {'a': 1} == {'a': 1} }} {{ none == none }} {{ 1 != 2 }}\n"
        ),
    ),
    dict(
        name="python_methods",
        template=(
            "{{ messages[1].content.split(',') }} {{ messages[1].content.split() }} {{ 'a,b,c'.split(',', 1) }} {{ '  a  b  '.split() }} {{ ''.split(',') }}\n"
            "{{ '  pad  '.strip() }}|{{ 'xxpadxx'.strip('x') }}|{{ '  l'.lstrip() }}|{{ 'r  \\n'.rstrip() }}|{{ '\\n\\nx'.lstrip('\\n') }}\n"
            "{{ 'Hello'.startswith('He') }} {{ 'Hello'.endswith('lo') }} {{ 'Hello'.startswith(('x', 'H')) }} {{ 'aXbX'.replace('X', '-') }} {{ 'aXbX'.replace('X', '-', 1) }}\n"
            "{{ 'mIx'.upper() }} {{ 'mIx'.lower() }} {{ 'hello world'.title() }} {{ 'hello'.capitalize() }} {{ 'banana'.count('a') }} {{ 'banana'.find('n') }} {{ 'banana'.rfind('n') }}\n"
            "{{ messages[0].get('content') }}|{{ messages[0].get('nope', 'dflt') }}|{{ messages[0].get('nope') }}|{{ messages[0].keys() | list }}|{{ messages[0].values() | list }}|{{ messages[0].items() | list }}\n"
            "{{ '-'.join(['a', 'b']) }} {{ 'a\\nb\\n'.splitlines() }} {{ '{} and {}'.format('x', 'y') }} {{ 'abc'.isalpha() }} {{ '12'.isdigit() }}\n"
            "{{ messages[1]['content'].split(':')[0] }} {{ messages[1].content.split(':')[-1].strip() }}\n"
        ),
    ),
    dict(
        name="slicing_and_concat",
        template=(
            "{%- set rest = messages[1:] -%}\n"
            "{{ rest | length }} {{ messages[-1].role }} {{ messages[:2] | map(attribute='role') | join(',') }} {{ messages[::2] | length }} {{ messages[1:-1] | length }}\n"
            "{{ 'abcdef'[1:3] }} {{ 'abcdef'[::-1] }} {{ 'abcdef'[-2:] }} {{ 'héllo'[1] }} {{ [1, 2, 3][::-1] }}\n"
            "{{ 'a' + 'b' + messages[0].role }} {{ 'n=' ~ 3 }} {{ [1] + [2, 3] }} {{ 'x' ~ none }} {{ 'x' ~ true }} {{ ('<' + 'turn' + '>') | upper }}\n"
            "{%- set s = '' %}{% for m in messages %}{% set s = s + m.role[:1] %}{% endfor %} s={{ s }}\n"
            "{%- set ns = namespace(s='') %}{% for m in messages %}{% set ns.s = ns.s + m.role[:1] %}{% endfor %} ns.s={{ ns.s }}\n"
        ),
    ),
    dict(
        name="printing",
        template=(
            "{{ none }}|{{ true }}|{{ false }}|{{ 1 }}|{{ -7 }}|{{ 1.0 }}|{{ 0.1 }}|{{ 2.5e-5 }}|{{ 1e20 }}|{{ 1e16 }}|{{ 123456789.125 }}|{{ 1e15 }}\n"
            "{{ [1, 'a', none, true, 2.0] }}|{{ {'a': 'x', 'b': [1, {'c': none}]} }}|{{ ['it\\'s', 'say \"hi\"', 'both \\' \"', 'back\\\\slash', 'nl\\n'] }}\n"
            "{{ messages[2].tool_calls[0].function.arguments }}|{{ messages[3].content }}|{{ nope }}|{{ messages[0].nope }}\n"
            "{{ ('a', 1) }}|{{ [] }}|{{ {} }}|{{ 'é\\u00a0\\u200b\\u2028x' }}\n"
        ),
    ),
    dict(
        name="whitespace_control",
        template=(
            "{# a comment #}\n"
            "start\n"
            "    {% if true %}\n"
            "    indented line\n"
            "    {% endif %}\n"
            "  {%- if true %} dash-left{% endif %}\n"
            "{% for i in [1, 2] %}\n"
            "  item {{ i }}\n"
            "{% endfor %}\n"
            "  {#- comment with dash #}\n"
            "    {%+ if true %}plus keeps indent{% endif %}\n"
            "{% if true +%}\n"
            "plus keeps newline\n"
            "{%- endif %}\n"
            "  {{ 'var keeps indent' }}\n"
            "{%- set x = 1 %}\n"
            "end {{- ' no space' }} \n"
            "{% raw %}{{ raw }} {% if %}{% endraw %}\n"
            "trailing newline next\n"
        ),
    ),
    dict(
        name="undefined_and_none",
        template=(
            "[{{ nope }}][{{ nope | default('d') }}][{{ messages[0].nope }}][{{ messages[0]['nope'] }}]\n"
            "{%- if nope %}yes{% else %} falsy{% endif %} {{ nope | length }} {% for x in nope %}x{% else %}empty-iter{% endfor %}\n"
            "{{ 'ok' if nope is not defined else 'defined' }} {{ messages[5] is defined }} {{ (messages | length) > 3 }}\n"
            "{{ tools is none }} {{ tools is defined }} {{ documents is none }} {{ add_generation_prompt }} {{ bos_token }}{{ eos_token }}\n"
            "{{ 'a' if false }}|{{ none is none }}|{{ none | string }}\n"
        ),
    ),
    dict(
        name="generation_tag",
        template=(
            "{%- for m in messages -%}\n"
            "{%- if m.role == 'assistant' -%}\n"
            "{% generation %}\n"
            "  {{ m.content }}<end>\n"
            "{%- endgeneration %}\n"
            "{%- else -%}\n"
            "{{ m.role }}\n"
            "{% endif -%}\n"
            "{%- endfor -%}\n"
        ),
    ),
    dict(
        name="kwargs_and_globals",
        template=(
            "{{ enable_thinking }} {{ custom | tojson }} {{ nested.a.b }} {{ dict(x=1, y='z') | dictsort }} {{ bos_token }}\n"
            "{%- if add_generation_prompt %} gen{% endif %}\n"
        ),
        kwargs={"custom": [1, "two", {"3": 3.0}], "enable_thinking": True, "nested": {"a": {"b": "deep"}}},
        add_generation_prompt=True,
    ),
    dict(
        name="message_normalisation",
        template=(
            "{%- for m in messages -%}\n"
            "{{ m.role }} content_defined={{ m.content is defined }} rc={{ m.reasoning_content | default('-') }} th={{ m.thinking | default('-') }} r={{ m.reasoning | default('-') }} keys={{ m | dictsort | map('first') | join(',') }}\n"
            "{% endfor -%}\n"
        ),
        messages=[
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": None, "reasoning_content": "why", "tool_calls": None},
            {"role": "assistant", "content": "a", "reasoning": "because"},
            {"role": "assistant", "content": "b", "thinking": "hmm"},
            {"role": "assistant", "content": "c", "reasoning_content": None, "reasoning": "r2"},
        ],
    ),
    dict(
        name="more_python_methods",
        template=(
            "{{ ' a b '.split(' ') }} {{ 'a,b'.split(',', 0) }} {{ ''.split() }} {{ '   '.split(None, 1) }} {{ ' a  b '.split(None, 1) }}\n"
            "{{ '<<a>>'.strip('<>') }} {{ 'abc'.lstrip('ba') }} {{ 'abc'.rstrip(none) }} {{ ''.splitlines() }} {{ '\\n'.splitlines() }}\n"
            "{{ 'hELLO wORLD'.capitalize() }} {{ [1, 2, 1].count(1) }}\n"
        ),
    ),
    dict(
        name="more_filters",
        template=(
            "{{ 'a\\nb' | indent(2, true) }}|{{ 'a\\n\\nb' | indent(2, blank=true) }}\n"
            "{{ '3.7' | int }} {{ 3.9 | int }} {{ '0x1A' | int(base=16) }} {{ none | int }} {{ 'z' | int(7) }} {{ true | int }} {{ '1e3' | int }}\n"
            "{{ '1e3' | float }} {{ 'inf' | float }} {{ none | float }} {{ 'x' | float(default=1.5) }}\n"
            "{{ 2.5 | round }} {{ 3.5 | round }} {{ 0.125 | round(2) }} {{ 2.675 | round(2) }} {{ 1.5 | round(0, 'floor') }} {{ 1.2 | round(0, 'ceil') }} {{ 15 | round(-1) }} {{ 7 | round }}\n"
            "{{ ['a', 'A', 'b'] | unique | list }} {{ ['a', 'A'] | unique(case_sensitive=true) | list }} {{ [{'n': 'b'}, {'n': 'A'}] | sort(attribute='n') | map(attribute='n') | list }} {{ ['b', 'A', 'a'] | sort(case_sensitive=true) | list }}\n"
            "{{ 'hello WORLD (foo) [bar] {baz} <q>-x' | title }} {{ 'hELLO wORLD' | capitalize }} {{ 'ﬁ ß' | upper }} {{ 'aaa' | replace('a', 'b', 2) }} {{ 'abc' | reverse }}\n"
            "{{ [1, 2, 3, 4] | select('odd') | list }} {{ [0, 1, ''] | select | list }} {{ messages | selectattr('role', 'in', ['user']) | list | length }} {{ messages | map(attribute='nope', default='z') | list }}\n"
            "{{ ['a', 'b'] | map('replace', 'a', 'x') | list }} {{ [' a '] | map('trim') | list }} {{ [1.5] | map('int') | list }} {{ [1, 2, 3] | batch(2, 'x') | list }} {{ [1, 2, 3, 4, 5] | slice(2) | list }}\n"
            "{{ 'abc' | first }} {{ 'abc' | last }} {{ (messages | last).role }} {% for g in messages | groupby('role') %}{{ g.grouper }}:{{ g.list | length }};{% endfor %}\n"
            "{{ [0.1, 1e-7, 1e16, 123456789.0, 5e-324, 1.7976931348623157e308, -0.0] | tojson }} {{ [1] | tojson(2) }} {{ {'a': [1]} | tojson(indent=0) }} {{ {'a': 1} | tojson(indent='\\t') }} {{ 'é' | tojson(true) }}\n"
            "{{ {'a': {'b': [1, {'c': []}]}, 'd': 'x'} | tojson(indent=2, separators=(', ', ' = ')) }}\n"
        ),
    ),
    dict(
        name="more_expressions",
        template=(
            "{% for n in [{'kids': [{'kids': [], 'name': 'b'}], 'name': 'a'}] recursive %}{{ n.name }}{{ loop.depth }}({{ loop(n.kids) }}){% endfor %}\n"
            "{% for x in [1, 2, 3] %}{{ loop.revindex }}{{ loop.revindex0 }}{{ loop.previtem }}{{ loop.nextitem }}{{ loop.changed(x) }};{% endfor %}\n"
            "{% set x %}block {{ 1 }}{% endset %}[{{ x }}]{% filter upper %}up{{ 'x' }}{% endfilter %} {{ '%s-%d' | format('a', 3) }} {{ '\\x41\\u00e9\\'\\\"' }}\n"
            "{{ none if true else 1 }}|{{ none or 'x' }}|{{ '' or none }}|{{ 0 and 'x' }}|{{ 'a' and 'b' }}|{{ not none }} {{ not [] }} {{ not {} }} {{ not 'a' }}\n"
            "{{ 'é' > 'z' }} {{ ['é', 'z', 'a', 'Z'] | sort | list }} {{ '🙂é' | length }} {{ '🙂é'[0] }} {{ '🙂é'[1:] }} {{ 'a' == 1 }} {{ 1 == true }} {{ 0 == false }} {{ none == 0 }}\n"
            "{{ -7 // 2 }} {{ -7 % 3 }} {{ 7.5 // 2 }} {{ 2 ** -1 }} {{ true + 1 }} {{ 1/3 }} {{ 0.1 + 0.2 }} {{ 10 ** 20 }} {{ 2 ** 64 }} {{ -0.0 }} {{ 5e-324 }} {{ 0.0001 }} {{ 9999999999999998.0 }}\n"
            "{{ messages[10:] }} {{ 'abc'[10:] }} {{ messages[-10:] | length }} {{ 'abc'[-1] }} {{ messages[0] == {'content': '  sys text  ', 'role': 'system'} }} {{ {'content': '  sys text  ', 'role': 'system'} in messages }}\n"
            "{{ none.foo }}|{{ none.foo is defined }}|{{ messages[0].content.foo is defined }}|{{ nope is sequence }} {{ nope is iterable }} {{ nope | list }} {{ nope | items | list }}\n"
            "{{ range(1, 10, 3) | list }} {{ range(5, 0, -2) | list }} {{ ('a', 'b') | list }} {{ [1, 2] * 2 }} {{ [[1, 2], [3]] | sum(start=[]) }}\n"
            "{%- for m in messages %}\n  {%- generation -%}\n  [{{ m.role }}]\n  {%- endgeneration %}\n{% endfor %}\n"
        ),
    ),
    dict(
        name="crlf_source",
        template="a\r\nb{% if true %}\r\nc{% endif %}\r\n{{ 'd\r\ne' }}\r\n",
    ),
    dict(
        name="dict_order",
        needs_preserve_order=True,
        template=(
            "{{ messages[0] | tojson }} {{ messages[0] | list }} {% for k, v in messages[0].items() %}{{ k }}={{ v }};{% endfor %}\n"
            "{{ {'b': 1, 'a': 2} }} {{ {'b': 1, 'a': 2} | tojson }} {{ messages[1] }}\n"
        ),
        messages=[
            {"role": "user", "content": "c", "name": "n"},
            {"role": "assistant", "content": "x", "reasoning_content": "r"},
        ],
    ),
    dict(
        name="raise_exception",
        template="{%- if messages[0].role != 'user' -%}{{ raise_exception('Conversation roles must start with user, got ' + messages[0].role) }}{%- endif -%}ok",
    ),
]


def render(tok, messages, tools=None, add_generation_prompt=True, kwargs=None, chat_template=None):
    return tok.apply_chat_template(
        messages,
        tools=tools,
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
        chat_template=chat_template,
        **(kwargs or {}),
    )


def main() -> None:
    os.chdir(REPO)
    tok = AutoTokenizer.from_pretrained(FIXTURE)
    template_path = f"{FIXTURE}/chat_template.jinja"
    with open(template_path, encoding="utf-8") as fh:
        template = fh.read()
    assert tok.chat_template == template, "the tokenizer does not use chat_template.jinja"

    cases = []
    for case in CASES:
        openai = case["messages"]
        native = to_template_messages(openai)
        tools = case.get("tools")
        agp = case.get("add_generation_prompt", True)
        kwargs = case.get("kwargs", {})
        expected = render(tok, copy.deepcopy(native), tools=copy.deepcopy(tools), add_generation_prompt=agp, kwargs=kwargs)
        ids = tok(expected, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == expected, case["name"]
        if "expected_contains" in case:
            assert case["expected_contains"] in expected, (case["name"], expected)
        if "expected_ends" in case:
            assert expected.endswith(case["expected_ends"]), (case["name"], expected)
        cases.append(
            {
                "name": case["name"],
                "tool_results": "attach",
                "openai_messages": openai,
                "template_messages": native,
                "tools": tools,
                "add_generation_prompt": agp,
                "kwargs": kwargs,
                "expected": expected,
                "expected_ids": ids,
            }
        )
    names = [c["name"] for c in cases]
    assert len(set(names)) == len(names), names

    features = []
    for feat in FEATURES:
        messages = feat.get("messages", FEATURE_MESSAGES)
        entry = {
            "name": feat["name"],
            "template": feat["template"],
            "messages": messages,
            "tools": feat.get("tools"),
            "add_generation_prompt": feat.get("add_generation_prompt", False),
            "kwargs": feat.get("kwargs", {}),
        }
        if feat.get("needs_preserve_order"):
            entry["needs_preserve_order"] = True
        try:
            entry["expected"] = render(
                tok,
                copy.deepcopy(messages),
                tools=copy.deepcopy(entry["tools"]),
                add_generation_prompt=entry["add_generation_prompt"],
                kwargs=entry["kwargs"],
                chat_template=feat["template"],
            )
        except jinja2.exceptions.TemplateError as e:
            entry["expected_error"] = str(e)
        features.append(entry)

    out = {
        "generator": {
            "script": SCRIPT,
            "command": "bash conformance/fixtures_gen/run.sh",
            "versions": {
                "python": platform.python_version(),
                "transformers": transformers.__version__,
                "jinja2": jinja2.__version__,
                "tokenizers": tokenizers.__version__,
            },
            "render": "AutoTokenizer.from_pretrained(fixture).apply_chat_template(template_messages, tools=tools, "
            "add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs); expected_ids = "
            "tokenizer(expected, add_special_tokens=False).input_ids",
        },
        "template": template_path,
        "tokenizer": f"{FIXTURE}/tokenizer.json",
        "special_tokens": tok.special_tokens_map,
        "cases": cases,
        "feature_templates": features,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    text = json.dumps(out, indent=2, ensure_ascii=False) + "\n"
    with open(OUT, "w", encoding="utf-8") as fh:
        fh.write(text)
    print(f"wrote {OUT}: {len(cases)} cases, {len(features)} feature templates", file=sys.stderr)


if __name__ == "__main__":
    main()
