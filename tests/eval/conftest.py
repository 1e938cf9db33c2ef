"""Shared fixtures of the eval tests: the Wikipedia corpus, SmolLM2's tokenizer, and engines
on the default model built the way `bitfold eval ppl` builds them (KV sized to the windows)."""
from __future__ import annotations

import pytest

from bitfold.config import EngineConfig
from bitfold.errors import BitfoldError


@pytest.fixture(scope="session")
def wiki_docs():
    from bitfold.eval.corpora import load_documents

    try:
        return load_documents("wiki")
    except BitfoldError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_source(smollm2_path):
    from bitfold.loader import open_model

    return open_model(smollm2_path)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_source):
    return smollm2_source.load_tokenizer()


def make_engine(source, **overrides):
    """An fp32 CPU engine on `source` with room for 8 windows of 128 tokens; the GGUF dequantized
    at load (`weights="dense"`): the reference the scores are checked against transformers with."""
    from bitfold.engine import LLMEngine

    kw = dict(model=source.path, device="cpu", dtype="float32", num_kv_blocks=8 * 8, block_size=16,
              max_model_len=128, max_num_seqs=8, weights="dense")
    kw.update(overrides)
    return LLMEngine(EngineConfig(**kw), source=source)
