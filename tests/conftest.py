import os

import pytest
import torch

# Kernel tests run on a GPU when there is one, else through Triton's CPU interpreter. The
# variable must be set before anything imports Triton (importing bitfold does), so here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2_path():
    from bitfold.errors import ModelLoadError
    from bitfold.loader.default_model import default_model_path

    try:
        return default_model_path()
    except ModelLoadError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_llm(smollm2_path):
    """One engine on the default model dequantized at load (`weights="dense"`, float32): the
    reference path, shared across tests (loading takes seconds)."""
    from bitfold import LLM

    return LLM(smollm2_path, device="cpu", kv_cache_memory_gb=0.5, weights="dense")


@pytest.fixture(scope="session")
def smollm2_default(smollm2_path):
    """The default model with default settings: on the CPU its Q4_1 blocks run through the
    low-bit LUT kernels (`--weights auto` = the `gguf` format)."""
    from bitfold import LLM

    return LLM(smollm2_path, device="cpu", kv_cache_memory_gb=0.25)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_path):
    """transformers' own GGUF loading of the same file: the independent reference."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    folder, name = os.path.split(smollm2_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_llm):
    """A tiny random llama (vocab 320) saved by transformers, with SmolLM2's tokenizer and chat
    template so the whole engine (text in, text out) runs on it in milliseconds per step."""
    import json

    from tests.helpers import write_tiny_hf_model

    folder = tmp_path_factory.mktemp("tiny-llama")
    write_tiny_hf_model("llama", folder, seed=3)
    tok = smollm2_llm.tokenizer
    tok._backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": tok.bos_token, "eos_token": "<|im_end|>", "chat_template": tok.chat_template}))
    return folder
