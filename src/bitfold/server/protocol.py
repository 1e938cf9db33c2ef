"""OpenAI's request bodies as pydantic models, and OpenAI's error shape.

Choices, each as OpenAI does it (https://platform.openai.com/docs/api-reference):
- Unknown parameters are refused with 400 ("Unrecognized request argument supplied: x"), not
  ignored: a client that asks for `logit_bias` or `tools` must learn they are not applied.
  The same holds for known parameters bitfold does not implement, unless given their default
  (`n=1`, `best_of=1`, `echo=false`, `logit_bias={}`, `response_format={"type": "text"}`).
- Types are strict (`"max_tokens": "5"` is a 400), `null` means "the default".
- Two extensions that vLLM has too: `top_k` and `ignore_eos` (the serving benchmark sets it to
  fix output lengths).
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from bitfold.engine import MAX_LOGPROBS  # OpenAI's top_logprobs limit; the engine's too
from bitfold.errors import InvalidRequestError
from bitfold.loader.tokenizer import check_text
from bitfold.sampling import SamplingParams
from bitfold.server.http_errors import APIError


def _unicode(v: str) -> str:
    try:
        check_text(v, "the text")
    except InvalidRequestError as e:  # pydantic reports a ValueError as a 400 naming the parameter
        raise ValueError(str(e)) from None
    return v


# Text: JSON can spell a lone surrogate ("\\ud800"), which is not Unicode; refused like any bad value.
Text = Annotated[str, AfterValidator(_unicode)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = False


class _Common(_Strict):
    """Parameters shared by /v1/completions and /v1/chat/completions."""

    model: Text
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    user: Text | None = None  # accepted and ignored, as a label
    top_k: int | None = Field(None, ge=-1, description="bitfold extension: keep the k most likely tokens")
    ignore_eos: bool | None = Field(False, description="bitfold extension: generate past end-of-sequence")

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v):
        if v not in (None, 1):
            raise ValueError("only n=1 is supported; send several requests for several choices")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v):
        if v:
            raise ValueError("logit_bias is not supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else v or []
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return v

    def check(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """The engine's SamplingParams; OpenAI's defaults for what was left out (temperature 1)."""
        return SamplingParams(
            temperature=1.0 if self.temperature is None else float(self.temperature),
            top_p=1.0 if self.top_p is None else float(self.top_p),
            top_k=self.top_k or 0, max_tokens=max_tokens, seed=self.seed, stop=self.stop,
            ignore_eos=bool(self.ignore_eos), presence_penalty=float(self.presence_penalty or 0.0),
            frequency_penalty=float(self.frequency_penalty or 0.0), logprobs=logprobs)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError(f"got {len(v)} prompts; bitfold serves one prompt per request")
            v = v[0]
        if isinstance(v, list) and any(t < 0 for t in v):
            raise ValueError("token ids must be >= 0")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        if v:
            raise ValueError("echo is not supported")
        return v

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, v):
        if v not in (None, 1):
            raise ValueError("only best_of=1 is supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        if v:
            raise ValueError("suffix is not supported")
        return v


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    def as_template_message(self) -> dict[str, str]:
        """{role, content} for the chat template: text parts joined, `developer` as `system`
        (OpenAI's newer name for it)."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None

    def check(self) -> None:
        super().check()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, the body of every 4xx/5xx bitfold sends."""

    error: ErrorDetail
