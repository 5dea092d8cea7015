"""The engine contract: request defaults and limits, and errors that survive pickling."""

import pickle

import pytest
from pydantic import ValidationError

from configs.app_args import LimitsConfig
from configs.model_spec import TinySpec
from deployments.types import (
    DeadlineExceededError,
    EngineError,
    GenerationRequest,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    RequestCancelledError,
    ServiceError,
    check_limits,
    unwrap_error,
)


@pytest.mark.parametrize(
    "cls, status",
    [
        (InvalidRequestError, 400),
        (ModelNotFoundError, 404),
        (RequestCancelledError, 409),
        (OverloadedError, 503),
        (DeadlineExceededError, 504),
        (EngineError, 500),
    ],
)
def test_errors_pickle_with_their_fields(cls, status):
    error = cls("bad width", param="width", code="invalid_size")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is cls and isinstance(copy, ServiceError)
    assert (copy.message, copy.param, copy.code, copy.status_code) == ("bad width", "width", "invalid_size", status)


def test_unwrap_error_follows_cause_chain():
    class Wrapper(Exception):
        def __init__(self, cause):
            self.cause = cause

    inner = InvalidRequestError("x")
    assert unwrap_error(Wrapper(Wrapper(inner))) is inner
    plain = RuntimeError("boom")
    assert unwrap_error(plain) is plain


def test_with_defaults_fills_only_missing_settings():
    spec = TinySpec()
    request = GenerationRequest(prompt="p", width=64, scheduler="DDIM").with_defaults(spec)
    assert (request.width, request.height) == (64, 128)
    assert request.num_inference_steps == spec.default_steps
    assert request.guidance_scale == spec.default_guidance_scale
    assert request.scheduler == "ddim"
    assert GenerationRequest(prompt="p", guidance_scale=0.0).with_defaults(spec).guidance_scale == 0.0


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"width": 65}, "width"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"seed": -1}, "seed"),
        ({"scheduler": "nope"}, "scheduler"),
        ({"prompt": ""}, "prompt"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_request_validation_names_the_field(fields, param):
    with pytest.raises(ValidationError) as info:
        GenerationRequest(**{"prompt": "p", **fields})
    assert param in str(info.value)


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"width": 4096, "height": 4096}, "width"),
        ({"width": 32}, "width"),
        ({"num_inference_steps": 151}, "num_inference_steps"),
        ({"prompt": "x" * 4001}, "prompt"),
        ({"negative_prompt": "x" * 4001}, "negative_prompt"),
        ({"prompt": "   "}, "prompt"),
    ],
)
def test_limits_name_the_field(fields, param):
    request = GenerationRequest(**{"prompt": "p", **fields}).with_defaults(TinySpec())
    with pytest.raises(InvalidRequestError) as info:
        check_limits(request, LimitsConfig())
    assert info.value.param == param and info.value.status_code == 400


def test_request_within_limits_passes():
    check_limits(GenerationRequest(prompt="p").with_defaults(TinySpec()), LimitsConfig())
