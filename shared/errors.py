"""Errors the gateway returns, in the OpenAI/Azure error shape so that SDKs raise their usual exceptions."""
from __future__ import annotations

from typing import Mapping

import orjson


class GatewayError(Exception):
    """An error answered to the client as `{"error": {message, type, code, param}}`."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        error_type: str | None = None,
        headers: Mapping[str, str] | None = None,
        details: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.details = dict(details or {})  # extra members of the error object (Azure's innererror)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.error_type = error_type or _default_type(status)
        self.headers = dict(headers or {})

    def body(self) -> bytes:
        return error_body(self.message, self.code, self.error_type, self.param, self.details)


def error_body(message: str, code: str, error_type: str, param: str | None = None, details: Mapping[str, object] | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": error_type, "code": code, "param": param, **(details or {})}})


def _default_type(status: int) -> str:
    if status == 401:
        return "invalid_request_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


# Constructors for the errors of the README's error table that the gateway raises itself.
def invalid_request(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, "invalid_request", message, param=param)


def not_found(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(404, "not_found", message, param=param)


def request_too_large(limit: int, what: str = "body") -> GatewayError:
    if what == "upload":
        return GatewayError(413, "request_too_large",
                            f"The upload is larger than the gateway's limit of {limit} bytes ({limit / 1048576:.0f} MiB, SEKISHO_MAX_UPLOAD_BYTES); "
                            "split the audio, or send a smaller or compressed file.")
    return GatewayError(413, "request_too_large", f"Request body is larger than the limit of {limit} bytes.")


def upstream_error(message: str) -> GatewayError:
    return GatewayError(502, "upstream_error", message)


def upstream_timeout(message: str) -> GatewayError:
    return GatewayError(504, "upstream_timeout", message)
