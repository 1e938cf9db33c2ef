"""`--config name:key=value,...`: every key and value is checked before any model loads."""
import pytest

from bitfold.config import EngineConfig
from bitfold.errors import BitfoldError
from bitfold.eval.configs import parse_config, parse_configs


def test_values_are_typed_from_engine_config_fields():
    c = parse_config("x:dtype=bfloat16,block-size=32,kv_cache_memory_gb=0.5,enforce_eager=true,max_model_len=none")
    assert c.name == "x"
    assert c.overrides == {"dtype": "bfloat16", "block_size": 32, "kv_cache_memory_gb": 0.5, "enforce_eager": True,
                           "max_model_len": None}
    cfg = c.engine_config(EngineConfig(device="cpu", dtype="float32"), max_model_len=256)
    assert (cfg.device, cfg.dtype, cfg.block_size, cfg.max_model_len) == ("cpu", "bfloat16", 32, 256)


def test_defaults_fill_only_unset_fields():
    cfg = parse_config("a:max_model_len=64").engine_config(EngineConfig(), max_model_len=256)
    assert cfg.max_model_len == 64


def test_no_config_means_the_engine_flags_alone():
    [c] = parse_configs(None)
    assert c.name == "base" and c.overrides == {}


@pytest.mark.parametrize("spec, words", [
    ("x:foo=1", "unknown engine setting 'foo'"),
    ("x:dtype=float8", "not one of"),
    ("x:block_size=three", "not a value of type int"),
    ("x:block_size=3", "power of two"),
    ("x:enforce_eager=maybe", "true or false"),
    ("x:kv_cache=nope", "unknown KV cache 'nope'"),
    ("x:attention_backend=nope", "unknown attention backend 'nope'"),
    ("x:dtype", "is not key=value"),
    ("x:dtype=float32,dtype=bfloat16", "set twice"),
    (":dtype=float32", "starts with a name"),
    ("a b:dtype=float32", "starts with a name"),
])
def test_bad_specs_are_clear_errors(spec, words):
    with pytest.raises(BitfoldError, match=words.replace("(", r"\(")):
        parse_config(spec)


def test_names_must_be_unique():
    with pytest.raises(BitfoldError, match="used twice"):
        parse_configs(["a:dtype=float32", "a:dtype=bfloat16"])
