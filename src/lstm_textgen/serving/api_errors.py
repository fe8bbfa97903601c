"""HTTP answers other than 200 of `lstm-textgen serve`, in OpenAI's error shape (what its clients turn
into `BadRequestError`, `AuthenticationError`, ...), and the same documented in the OpenAPI schema."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from lstm_textgen.errors import UserError
from lstm_textgen.inference.rows import Cancelled, Overloaded
from lstm_textgen.serving.completions import error_body

RETRY_AFTER_SECONDS = "1"
REASONS = {400: "invalid", 401: "unauthorized", 404: "invalid", 503: "overloaded", 504: "timeout"}


class ApiError(Exception):
    """An HTTP answer other than 200, in OpenAI's error shape."""

    def __init__(
        self, status: int, message: str, kind: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    @property
    def reason(self) -> str:
        """The `reason` label of the rejected-requests metric."""
        return REASONS.get(self.status, "invalid")

    def response(self) -> JSONResponse:
        headers = {"Retry-After": RETRY_AFTER_SECONDS} if self.status == 503 else None
        body = error_body(str(self), self.kind, self.param, self.code)
        return JSONResponse(body, status_code=self.status, headers=headers)


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param)


def overloaded(exc: Overloaded) -> ApiError:
    return ApiError(503, str(exc), "server_overloaded", code="overloaded")


def row_error(exc: UserError) -> ApiError:
    """A row that failed once generating: its server is stopping (503), its time limit passed (504),
    or its own draw failed (400)."""
    if isinstance(exc, Overloaded):
        return overloaded(exc)
    if isinstance(exc, Cancelled):
        return ApiError(504, f"{exc}: ask for fewer tokens, or retry", "timeout", code="timeout")
    return invalid(str(exc))


_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_DESCRIPTIONS = {
    400: "the request is refused: `error.message` names the field and the limit",
    401: "no valid API key (`Authorization: Bearer KEY`, when the server has LSTM_TEXTGEN_API_KEYS)",
    404: "the request names a model this server does not serve",
    503: "every batch place is taken: retry after `Retry-After` seconds",
    504: "the request's time limit passed before its rows ended",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for these statuses, so that clients and fuzzers know them."""
    return {
        status: {
            "description": _DESCRIPTIONS[status],
            "content": {"application/json": {"schema": _ERROR_SCHEMA}},
        }
        for status in statuses
    }
