"""The router's error answer: an HTTP status with an OpenAI-style error body."""

from __future__ import annotations

from fastapi.responses import JSONResponse


class ApiError(Exception):
    """A request's failure as the client sees it: `status`, and the body's message, type
    and param."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.headers = headers

    def body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": None}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status, headers=self.headers)
