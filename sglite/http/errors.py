"""The HTTP front's errors: OpenAI's error JSON {"error": {"message", "type", "param", "code"}}
and the exceptions routes raise (ApiError becomes that JSON with its status; ClientGone: the
client left, its requests are aborted)."""

from __future__ import annotations

from fastapi.responses import JSONResponse

_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
                404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
                422: "invalid_request_error", 499: "client_closed_request",
                500: "internal_server_error", 503: "service_unavailable"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | int | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code if code is not None else status


class ClientGone(Exception):
    pass


def error_body(status: int, message: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code if code is not None else status}}


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(error_body(e.status, e.message, e.param, e.code), status_code=e.status)
