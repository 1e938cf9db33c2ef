"""Rendering a model's Jinja chat template into a prompt string.

Chat templates ship with models and are written against Hugging Face transformers' renderer, so
we reproduce its environment: an immutable sandbox (templates are untrusted code), `trim_blocks`
and `lstrip_blocks`, the `raise_exception` and `strftime_now` globals, a `tojson` that does not
HTML-escape, and the `{% generation %}` tag. A one-character difference in the prompt changes the
tokens the model sees, so "close enough" rendering is not good enough.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from bitfold.errors import BitfoldError


def _raise_exception(message: str) -> None:
    """Lets a template reject a conversation it cannot format (e.g. roles not alternating)."""
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """Jinja's own `tojson` HTML-escapes `<>&'`, which would corrupt tool schemas in prompts."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    """Templates such as Llama 3.x put today's date in the system prompt."""
    return datetime.now().strftime(fmt)


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks in
    transformers; for inference it only has to parse, and renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    """Compiling is the slow part and a server renders the same template for every request."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise BitfoldError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from e


def _check_messages(messages: Any) -> None:
    """Fail with the index and field at fault instead of a Jinja error deep inside the template."""
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        raise BitfoldError(
            f"messages must be a list of {{'role': str, 'content': str}} dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BitfoldError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        for field in ("role", "content"):
            if field not in message:
                raise BitfoldError(f"messages[{i}] has no '{field}' field; every message needs 'role' and 'content'")
            if not isinstance(message[field], str):
                raise BitfoldError(
                    f"messages[{i}]['{field}'] must be a string, got {type(message[field]).__name__}")


def render_chat_template(template: str, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
                         bos_token: str = "", eos_token: str = "", **extra: Any) -> str:
    """Render `messages` with `template` exactly as transformers' `apply_chat_template(tokenize=False)`.

    `add_generation_prompt` appends the header that opens the assistant's turn; `extra` is passed
    to the template as further variables (e.g. `tools`). Raises `BitfoldError` for malformed
    messages, a template that does not parse, or one that refuses the conversation.
    """
    _check_messages(messages)
    compiled = _compile(template)
    try:
        return compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, **extra)
    except (jinja2.TemplateError, TypeError) as e:  # TypeError: e.g. `+` on a value the template misjudged
        raise BitfoldError(f"chat template failed to render this conversation: {e}") from e
