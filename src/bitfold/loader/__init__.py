"""Checkpoint loaders: HF folders (safetensors) and GGUF files, both yielding a ModelSource."""
from __future__ import annotations

import os

from bitfold.errors import ModelLoadError
from bitfold.loader.source import ModelSource


def open_model(path: str | None) -> ModelSource:
    """path: an HF model folder, a .gguf file, or None for the embedded default model."""
    from bitfold.loader.default_model import default_model_path
    from bitfold.loader.gguf_file import load_gguf
    from bitfold.loader.hf import load_hf_folder

    if path is None:
        path = default_model_path()
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        return load_hf_folder(path)
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file or folder (expected an HF model folder or a .gguf file)")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:  # no permission, a special file...
        raise ModelLoadError(f"{path}: cannot be read ({e.strerror or e})") from None
    if magic == b"GGUF":
        return load_gguf(path)
    raise ModelLoadError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF') and not a model folder")
