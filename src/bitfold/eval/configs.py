"""Named engine configurations to compare: `--config name:key=value,key=value`.

A configuration is a set of EngineConfig overrides on top of the command's own engine flags
(`ref:dtype=float32`, `bf16:dtype=bfloat16`, `int4kv:kv_cache=int4`). The first one given is
the reference the others are judged against (KL divergence, top-1 agreement). Every key and
value is checked here, before any model is loaded, so a typo costs nothing.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from bitfold.config import EngineConfig
from bitfold.errors import BitfoldError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_FIELDS = {f.name: f for f in dataclasses.fields(EngineConfig)}


@dataclass(frozen=True)
class EvalConfig:
    """A named set of EngineConfig overrides. `spec` is the text it was parsed from."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    spec: str = ""

    def engine_config(self, base: EngineConfig, **defaults: Any) -> EngineConfig:
        """`base` with this configuration's overrides applied; `defaults` fill fields that
        neither the base nor the overrides set (fields still at None)."""
        cfg = dataclasses.replace(base, **self.overrides)
        fill = {k: v for k, v in defaults.items() if getattr(cfg, k) is None}
        return dataclasses.replace(cfg, **fill)

    def describe(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.overrides.items()) or "(engine flags)"


def _convert(spec: str, key: str, text: str) -> Any:
    f = _FIELDS[key]
    kind = str(f.type)
    if text.lower() == "none" and "None" in kind:
        return None
    try:
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            return float(text)
        if kind == "bool":
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
    except ValueError:
        expected = {"bool": "true or false"}.get(kind, f"a value of type {kind}")
        raise BitfoldError(f"--config {spec!r}: {key}={text!r} is not {expected}") from None
    choices = f.metadata.get("choices")
    if choices and text not in choices:
        raise BitfoldError(f"--config {spec!r}: {key}={text!r} is not one of {', '.join(choices)}")
    return text


def _check_registries(spec: str, overrides: dict[str, Any]) -> None:
    """Names that live in registries (KV codecs, attention backends) are checked against them now,
    not after a model has loaded."""
    from bitfold.kvcache.codecs import KV_CODECS
    from bitfold.attention import ATTENTION_BACKENDS

    codec = overrides.get("kv_cache")
    if codec is not None and codec not in KV_CODECS:
        raise BitfoldError(f"--config {spec!r}: unknown KV cache {codec!r}; known: {', '.join(KV_CODECS.names())}")
    backend = overrides.get("attention_backend")
    if backend is not None and backend != "auto" and backend not in ATTENTION_BACKENDS:
        raise BitfoldError(f"--config {spec!r}: unknown attention backend {backend!r}; known: auto, "
                           f"{', '.join(ATTENTION_BACKENDS.names())}")


def parse_config(spec: str) -> EvalConfig:
    """`name` or `name:key=value,key=value` (keys are EngineConfig fields; `-` or `_`)."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if not _NAME.match(name):
        raise BitfoldError(f"--config {spec!r}: a configuration starts with a name of letters, digits, "
                           "'_', '.', '+' or '-', e.g. 'bf16:dtype=bfloat16'")
    overrides: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq:
            raise BitfoldError(f"--config {spec!r}: {item!r} is not key=value")
        if key not in _FIELDS:
            raise BitfoldError(f"--config {spec!r}: unknown engine setting {key!r}; known: {', '.join(sorted(_FIELDS))}")
        if key in overrides:
            raise BitfoldError(f"--config {spec!r}: {key} is set twice")
        overrides[key] = _convert(spec, key, value.strip())
    _check_registries(spec, overrides)
    try:
        EngineConfig(**overrides).validate()
    except BitfoldError as e:
        raise BitfoldError(f"--config {spec!r}: {e}") from None
    return EvalConfig(name, overrides, spec)


def parse_configs(specs: list[str] | None) -> list[EvalConfig]:
    """The command's configurations in order (the first is the reference); none given means one
    configuration, `base`, that is the command's engine flags alone."""
    configs = [parse_config(s) for s in specs or []] or [EvalConfig("base", {}, "base")]
    seen: set[str] = set()
    for c in configs:
        if c.name in seen:
            raise BitfoldError(f"--config: the name {c.name!r} is used twice; each configuration needs its own")
        seen.add(c.name)
    return configs
