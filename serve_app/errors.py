"""One error envelope, `{"error": {"message", "type", "param", "code"}}`, for every failure.

The status comes from the exception: `ServiceError` subclasses carry their own `status_code`
(also when they arrive wrapped by Ray from an engine replica); request validation is 400 naming
the field; anything else is a 500 with a generic message and the traceback only in the log.
"""

import json
import logging
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.exceptions import GetTimeoutError
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.types import (
    DeadlineExceededError,
    InvalidRequestError,
    OverloadedError,
    ServiceError,
    TooManyRequestsError,
    unwrap_error,
)

logger = logging.getLogger("ray.serve")

#: HTTP status -> error `type` for errors that are not ServiceErrors (routing, framework).
_TYPE_FOR_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


def error_response(
    status: int,
    message: str,
    error_type: str,
    param: Optional[str] = None,
    code: Optional[str] = None,
    headers: Optional[dict[str, str]] = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def service_error_response(exc: ServiceError) -> JSONResponse:
    headers = {"Retry-After": "5"} if isinstance(exc, (OverloadedError, TooManyRequestsError)) else None
    return error_response(exc.status_code, exc.message, exc.error_type, exc.param, exc.code, headers)


def exception_response(exc: BaseException) -> JSONResponse:
    """The response for any exception raised while serving a request."""
    exc = unwrap_error(exc)
    if isinstance(exc, ServiceError):
        return service_error_response(exc)
    if isinstance(exc, BackPressureError):
        return service_error_response(OverloadedError("the server is at capacity; retry later", code="overloaded"))
    if isinstance(exc, (TimeoutError, GetTimeoutError)):
        return service_error_response(DeadlineExceededError("the request timed out", code="timeout"))
    logger.error("unhandled error while serving a request", exc_info=exc)
    return error_response(500, "internal server error", "server_error", code="internal_error")




def invalid_request_from(errors: list[dict]) -> InvalidRequestError:
    """The 400 for pydantic/FastAPI validation errors: the first error, its field as `param`."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        return InvalidRequestError("request body is not valid JSON", code="invalid_json")
    parts = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    param = ".".join(parts) or None
    kind = first.get("type")
    if kind == "extra_forbidden":
        message = f"unrecognized request argument: {param}"
    elif kind == "missing":
        message = f"missing required argument: {param}"
    else:
        detail = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        message = f"invalid {param}: {detail}" if param else detail
    return InvalidRequestError(message, param=param, code=kind)


@contextmanager
def renamed_params(rename: Callable[[Optional[str]], Optional[str]]) -> Iterator[None]:
    """Report `InvalidRequestError`s raised inside under another field name (e.g. `width` as
    `size`, or `width` as `params.width` when the fields are nested in a job)."""
    try:
        yield
    except InvalidRequestError as exc:
        param = rename(exc.param)
        if param == exc.param:
            raise
        message = exc.message if exc.param is None or param is None else exc.message.replace(exc.param, param, 1)
        raise InvalidRequestError(message, param=param, code=exc.code) from None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return service_error_response(invalid_request_from(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        error_type = _TYPE_FOR_STATUS.get(exc.status_code, "server_error")
        return error_response(exc.status_code, detail, error_type, headers=getattr(exc, "headers", None))

    async def _on_error(_: Request, exc: Exception) -> JSONResponse:
        return exception_response(exc)

    # Errors a route may raise by design (ServiceErrors, also wrapped by Ray; Serve backpressure;
    # timeouts) are answered here, so routes need no try/except. Anything else is a bug: the
    # `Exception` handler still answers the envelope, and Starlette logs it.
    for expected in (ServiceError, BackPressureError, TimeoutError, GetTimeoutError):
        app.add_exception_handler(expected, _on_error)
    app.add_exception_handler(Exception, _on_error)
