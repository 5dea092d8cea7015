"""Reading a request body that may be JSON (images as base64) or multipart/form-data (files).

The image endpoints accept both, like the A1111 and OpenAI APIs their users come from; the result
is the same validated pydantic model either way, and every failure is a `ServiceError` naming the
field: 400 bad value, 413 too large, 415 wrong content type.
"""

import json
from typing import Any, Optional, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from configs.app_args import LimitsConfig
from deployments.types import InvalidRequestError, PayloadTooLargeError, UnsupportedMediaTypeError
from serve_app.errors import invalid_request_from, service_error_response

Body = TypeVar("Body", bound=BaseModel)

#: Non-file parts of a form (prompt, numbers) are small; images come as files.
_MAX_FORM_FIELDS = 64
_MAX_FORM_FILES = 4
_ACCEPTED_FILE_TYPES = ("image/", "application/octet-stream")


def body_limit(limits: LimitsConfig) -> int:
    """Largest body accepted: two images, base64-inflated, plus the other fields."""
    return 3 * limits.max_upload_bytes + 1024 * 1024


class BodyLimit:
    """ASGI middleware: every request body is at most `limit` bytes (or its route's entry in
    `overrides`, by method and path), whichever route reads it. A declared length over it is
    answered 413 unread; a body that grows past it while arriving (no or a false content-length)
    stops with 413 at that chunk."""

    def __init__(self, app: Any, limit: int, overrides: Optional[dict[tuple[str, str], int]] = None):
        self.app, self.limit, self.overrides = app, limit, overrides or {}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.overrides.get((scope["method"], scope["path"]), self.limit)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            error = PayloadTooLargeError(f"request body is {int(declared)} bytes; the limit is {limit}", code="body_too_large")
            return await service_error_response(error)(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                # An HTTPException is the one error FastAPI lets through from reading a body; the
                # app's handler answers it in the envelope.
                raise HTTPException(413, f"request body exceeds {limit} bytes")
            return message

        await self.app(scope, counted, send)


async def parse_body(request: Request, model: type[Body], limits: LimitsConfig) -> Body:
    """The body as `model`, from JSON or multipart/form-data (its size is bounded by `BodyLimit`)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        data = await _json_fields(request)
    elif content_type == "multipart/form-data":
        data = await _form_fields(request, limits)
    else:
        raise UnsupportedMediaTypeError(
            f"content type {content_type or 'none'!r} is not supported; send application/json or multipart/form-data",
            code="unsupported_content_type",
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_request_from(exc.errors()) from None


async def _json_fields(request: Request) -> dict:
    raw = bytearray()  # appended in place: a 60 MB body in small chunks must not copy quadratically
    async for chunk in request.stream():
        raw += chunk
    try:
        data = json.loads(raw)
    except ValueError:
        raise InvalidRequestError("request body is not valid JSON", code="invalid_json") from None
    except RecursionError:  # the decoder recurses per nesting level; no valid body nests deeply
        raise InvalidRequestError("request body is nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise InvalidRequestError("request body must be a JSON object", code="invalid_json")
    return data


async def _form_fields(request: Request, limits: LimitsConfig) -> dict:
    form = await request.form(max_files=_MAX_FORM_FILES, max_fields=_MAX_FORM_FIELDS)
    data: dict = {}
    for key, value in form.multi_items():
        name = key.removesuffix("[]")  # OpenAI clients name list parts `image[]`
        if name in data:
            raise InvalidRequestError(f"{name} was given more than once; send one", param=name, code="duplicate_field")
        if isinstance(value, UploadFile):
            data[name] = await _file_bytes(name, value, limits)
        else:
            data[name] = value
    return data


async def _file_bytes(name: str, upload: UploadFile, limits: LimitsConfig) -> bytes:
    content_type = (upload.content_type or "application/octet-stream").lower()
    if not content_type.startswith(_ACCEPTED_FILE_TYPES):
        raise UnsupportedMediaTypeError(
            f"{name} has content type {content_type!r}; send an image (PNG, JPEG or WEBP)",
            param=name,
            code="unsupported_image_format",
        )
    if upload.size is not None and upload.size > limits.max_upload_bytes:
        raise PayloadTooLargeError(
            f"{name} is {upload.size} bytes; the limit is {limits.max_upload_bytes}", param=name, code="file_too_large"
        )
    return await upload.read()
