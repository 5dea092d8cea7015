"""One error envelope, `{"error": {"message", "type", "param", "code"}}`, for every failure.

The status comes from the exception: `ServiceError` subclasses carry their own `status_code`
(also when they arrive wrapped by Ray from an engine replica); request validation is 400 naming
the field; a full queue or a lost replica is 503 with `Retry-After`; anything else is a 500 with a
generic message and the traceback only in the log.
"""

import json
import logging
import math
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.exceptions import GetTimeoutError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.types import (
    DeadlineExceededError,
    InvalidRequestError,
    OverloadedError,
    ServiceError,
    TooManyRequestsError,
    UnauthorizedError,
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

#: Seconds a client is told to wait after a 503/429 (`Retry-After`): about one batch of work.
RETRY_AFTER_S = 5

#: Discriminator tags pydantic puts in an error's location for tagged unions (a job's or batch
#: item's `kind`; `controlnet` as one object or a list); they are not fields, so `param` leaves them out.
_UNION_TAGS = {"txt2img", "img2img", "inpaint", "one", "many"}

#: FastAPI's detail when the JSON decoder itself fails beyond a syntax error (a body nested deeper
#: than Python's recursion limit); answered like any other unreadable JSON.
_FASTAPI_BODY_ERROR = "There was an error parsing the body"


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
    headers = {}
    if isinstance(exc, (OverloadedError, TooManyRequestsError)):
        # A quota's refusal knows when its window frees up; a full queue does not.
        headers["Retry-After"] = str(max(1, math.ceil(getattr(exc, "retry_after_s", RETRY_AFTER_S))))
    if isinstance(exc, UnauthorizedError):
        headers["WWW-Authenticate"] = "Bearer"
    return error_response(exc.status_code, exc.message, exc.error_type, exc.param, exc.code, headers or None)


def engine_call_error(exc: BaseException) -> BaseException:
    """What a failed handle call means to a client. Ray's own failures become 503s here, before
    they reach the app: Ray Serve installs its own plain-text handler for `BackPressureError` on
    every ingress app, which would bypass the envelope."""
    exc = unwrap_error(exc)
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, BackPressureError):
        return OverloadedError("the server is at capacity; retry later", code="overloaded")
    if isinstance(exc, (RayActorError, DeploymentUnavailableError)):
        # The replica died (or none is up) with the request in flight. It is not retried: a
        # request that crashes a replica would take the next one down too.
        return OverloadedError("the engine replica was lost; retry later", code="engine_unavailable")
    if isinstance(exc, (TimeoutError, GetTimeoutError)):
        return DeadlineExceededError("the request timed out", code="timeout")
    return exc


def exception_response(exc: BaseException) -> JSONResponse:
    """The response for any exception raised while serving a request."""
    exc = engine_call_error(exc)
    if isinstance(exc, ServiceError):
        return service_error_response(exc)
    logger.error("unhandled error while serving a request", exc_info=exc)
    return error_response(500, "internal server error", "server_error", code="internal_error")


def invalid_request_from(errors: list[dict]) -> InvalidRequestError:
    """The 400 for pydantic/FastAPI validation errors: the first error, its field as `param`."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        return InvalidRequestError("request body is not valid JSON", code="invalid_json")
    parts = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path") and p not in _UNION_TAGS]
    kind = first.get("type")
    if kind in ("union_tag_invalid", "union_tag_not_found"):  # every tagged union here is on `kind`
        parts.append("kind")
    param = ".".join(parts) or None
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


def _allowed_methods(app: FastAPI, scope: dict) -> list[str]:
    """Every method some route serves at this request's path (a path's GET and POST are separate
    routes, and Starlette's 405 names only the first route's)."""
    from starlette.routing import Match

    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches({**scope, "method": "GET"})
        route_methods = getattr(route, "methods", None)
        if match != Match.NONE and route_methods:
            methods |= set(route_methods)
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return service_error_response(invalid_request_from(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        error_type = _TYPE_FOR_STATUS.get(exc.status_code, "server_error")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(_allowed_methods(app, request.scope))
        if exc.status_code == 400 and detail == _FASTAPI_BODY_ERROR:
            return service_error_response(
                InvalidRequestError("request body is not valid JSON or is nested too deeply", code="invalid_json")
            )
        return error_response(exc.status_code, detail, error_type, headers=headers or None)

    async def _on_error(_: Request, exc: Exception) -> JSONResponse:
        return exception_response(exc)

    # Errors a route may raise by design (ServiceErrors, also wrapped by Ray; a lost replica;
    # timeouts) are answered here, so routes need no try/except. Anything else is a bug: the
    # `Exception` handler still answers the envelope, and Starlette logs it.
    for expected in (ServiceError, RayActorError, DeploymentUnavailableError, TimeoutError, GetTimeoutError):
        app.add_exception_handler(expected, _on_error)
    app.add_exception_handler(Exception, _on_error)
