"""bitfold: an LLM inference engine built around memory-bound decoding."""
from bitfold.engine import RequestOutput
from bitfold.errors import (BitfoldError, InvalidRequestError, InvalidSamplingParamsError, ModelLoadError,
                            PromptTooLongError, UnsupportedArchitectureError, UnsupportedFormatError)
from bitfold.llm import LLM
from bitfold.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "BitfoldError", "ModelLoadError", "UnsupportedArchitectureError",
           "UnsupportedFormatError", "InvalidRequestError", "PromptTooLongError", "InvalidSamplingParamsError"]
__version__ = "0.1.0"
