"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, and the HTTP
status for each exception a request can raise (typed bitfold errors are the client's fault: 400;
a full queue 429; a model not ready 503; anything else is a bug: a logged 500)."""
from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi.responses import JSONResponse

from bitfold.errors import BitfoldError, PromptTooLongError
from bitfold.server.async_engine import EngineUnavailableError, QueueFullError

log = logging.getLogger("bitfold")

_UNION_TAG = re.compile(r"^[A-Z]|\[|^(str|int|float|bool|none)$")


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = "invalid_value", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(errors: list[dict]) -> APIError:
    """A 400 from pydantic's (or FastAPI's) error list: the first error names the parameter."""
    if not errors:
        return APIError(400, "invalid request body")
    # A value in a union (`stop`: a string or a list of them) fails once per member; the member
    # whose own check failed (a ValueError: a lone surrogate, an empty stop string) says why,
    # where the others only say "not a list" / "not a string".
    e = next((e for e in errors if e.get("type") == "value_error"), errors[0])
    # pydantic puts the union member it tried into the location (`stop.str`, `prompt.list[int]`,
    # `messages.0.content.TextPart`): the parameter is the path without them.
    loc = [str(p) for p in e.get("loc", ()) if p != "body" and not _UNION_TAG.search(str(p))]
    param = ".".join(loc) or None
    if e.get("type") == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                        code="unrecognized_argument")
    if e.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({e.get('ctx', {}).get('error', e.get('msg'))})",
                        code="invalid_json")
    if not loc and e.get("type") in ("model_attributes_type", "dict_type", "model_type", "missing"):
        return APIError(400, "the request body must be a JSON object (Content-Type: application/json)",
                        code="invalid_json")
    msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
    return APIError(400, f"{param or 'body'}: {msg}{more}", param=param, code="invalid_value")


class _ErrorJSON(JSONResponse):
    """An error message may quote what the client sent (a model name...); a lone surrogate in it
    is written as its JSON escape instead of failing to encode (which would turn a 404 into a 500)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "backslashreplace")


def error_response(err: APIError) -> JSONResponse:
    return _ErrorJSON(err.body(), status_code=err.status, headers=err.headers)


def api_error(e: BaseException) -> APIError:
    """The HTTP answer for an exception raised while serving a request."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFullError):
        return APIError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"})
    if isinstance(e, EngineUnavailableError):
        return APIError(503, str(e), type="service_unavailable_error", code="model_not_ready",
                        headers={"Retry-After": "5"})
    if isinstance(e, PromptTooLongError):
        return APIError(400, str(e), code="context_length_exceeded")
    if isinstance(e, BitfoldError):  # typed bad input: sampling values, token ids, chat messages...
        return APIError(400, str(e), code="invalid_value")
    log.error("internal error while serving a request", exc_info=e)
    return APIError(500, f"internal server error ({type(e).__name__})", type="server_error", code="internal_error")
