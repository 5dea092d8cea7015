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
        ({"prompt": " \u3000\x85"}, "prompt"),  # only whitespace, also to Python's eye
        ({"negative_prompt": "bad \ud800"}, "negative_prompt"),  # a lone surrogate
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
    ],
)
def test_limits_name_the_field(fields, param):
    request = GenerationRequest(**{"prompt": "p", **fields}).with_defaults(TinySpec())
    with pytest.raises(InvalidRequestError) as info:
        check_limits(request, LimitsConfig())
    assert info.value.param == param and info.value.status_code == 400


def test_request_within_limits_passes():
    check_limits(GenerationRequest(prompt="p").with_defaults(TinySpec()), LimitsConfig())


def _rgb(width=64, height=64):
    import numpy as np

    return np.zeros((height, width, 3), dtype=np.uint8)


def _mask(width=64, height=64):
    import numpy as np

    return np.zeros((height, width), dtype=np.uint8)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"kind": "img2img"}, "init_image is required"),
        ({"kind": "inpaint", "init_image": _rgb()}, "mask_image is required"),
        ({"init_image": _rgb()}, "does not apply"),
        ({"kind": "img2img", "init_image": _rgb(), "mask_image": _mask()}, "does not apply"),
        ({"strength": 0.5}, "strength applies"),
        ({"kind": "img2img", "init_image": _rgb(), "padding_mask_crop": 8}, "inpaint"),
        ({"kind": "inpaint", "init_image": _rgb(), "mask_image": _mask(64, 72)}, "mask_image is 64x72"),
        ({"kind": "img2img", "init_image": _rgb(), "width": 128}, "init_image is 64x64"),
        ({"kind": "img2img", "init_image": _rgb()[:, :, 0]}, "init_image must be"),
        ({"kind": "img2img", "init_image": _rgb(), "strength": 0}, "strength"),
    ],
)
def test_kind_fields_are_checked(fields, message):
    with pytest.raises(ValidationError, match=message):
        GenerationRequest(prompt="p", **fields)


def test_edit_defaults_come_from_the_image_and_kind():
    request = GenerationRequest(prompt="p", kind="img2img", init_image=_rgb(96, 64)).with_defaults(TinySpec())
    assert (request.width, request.height, request.strength) == (96, 64, 0.75)
    inpaint = GenerationRequest(prompt="p", kind="inpaint", init_image=_rgb(), mask_image=_mask()).with_defaults(TinySpec())
    assert inpaint.strength == 1.0


def test_init_image_not_multiple_of_8_is_invalid():
    with pytest.raises(InvalidRequestError) as info:
        GenerationRequest(prompt="p", kind="img2img", init_image=_rgb(70, 64)).with_defaults(TinySpec())
    assert info.value.param == "init_image"


@pytest.mark.parametrize(
    "steps, strength, expected",
    [(10, 0.5, 5), (4, 0.2, 1), (1, 0.75, 1), (3, 1.0, 3), (7, 0.3, 2)],
)
def test_denoising_steps_run_at_least_one(steps, strength, expected):
    image = _rgb()
    request = GenerationRequest(prompt="p", kind="img2img", init_image=image, num_inference_steps=steps, strength=strength)
    assert request.with_defaults(TinySpec()).denoising_steps() == expected
    txt = GenerationRequest(prompt="p", num_inference_steps=steps).with_defaults(TinySpec())
    assert txt.denoising_steps() == steps


def test_not_blank_pattern_agrees_with_python():
    """The schema's regex class for "not only whitespace" is exactly what `str.strip` keeps."""
    import re

    from deployments.types import NOT_BLANK_PATTERN

    for code in range(0x3100):
        char = chr(code)
        assert bool(re.fullmatch(NOT_BLANK_PATTERN, char)) == bool(char.strip()), hex(code)
