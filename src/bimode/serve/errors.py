"""What `bimode serve` answers when it cannot serve a request: the client's errors (BadRequest, a 4xx naming the
field at fault) and the server's, both in OpenAI's error shape."""

from __future__ import annotations

from fastapi.responses import JSONResponse


class BadRequest(ValueError):
    """The client's error: `status` (400 unless said), the field at fault as `param`, OpenAI's `code` if any."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    """OpenAI's error shape."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": {"message": message, "type": kind, "param": param, "code": code or status}})


def server_failure(what: str, request_id: str) -> str:
    """A 500's message: what failed and the request id the server's log names, nothing of the internals."""
    return f"{what} (request {request_id}; the server's log has the details)"
