"""Typed errors for bad input.

Every error a user can cause derives from `BitfoldError`; the CLI prints its message as one
line and exits with status 2, the Python API lets it propagate. Messages say what was wrong,
where (file, field, parameter) and what was expected.
"""


class BitfoldError(Exception):
    """Base of every error bitfold raises on bad input; the CLI prints it as one line and exits 2."""


class ModelLoadError(BitfoldError):
    """A model file or folder is missing, unreadable or corrupt."""


class UnsupportedArchitectureError(ModelLoadError):
    """The checkpoint names a model architecture no registered model implements."""


class UnsupportedFormatError(ModelLoadError):
    """A tensor is stored in a format (e.g. a GGUF quantization type) bitfold cannot read."""


class InvalidRequestError(BitfoldError, ValueError):
    """A request cannot be served as given (prompt too long, invalid sampling values...)."""


class PromptTooLongError(InvalidRequestError):
    """The prompt does not fit the model's context or the KV cache."""


class InvalidSamplingParamsError(InvalidRequestError):
    """A sampling parameter is out of range."""
