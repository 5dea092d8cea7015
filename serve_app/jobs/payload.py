"""What a job runs, and its durable form: versioned JSON (images as lossless PNG), never a pickle.

A pickle in the job database would run code on load for anyone who can write the file, and would
break on any change to the classes it names; JSON with a version number does neither.
"""

import base64
import io
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from PIL import Image

from deployments.types import GenerationRequest
from serve_app.png import COMPRESS_LEVEL

#: Bump when the layout below changes; `from_json` refuses versions it does not know. 2 added
#: `controlnets` (settings, image as PNG), 3 `refiner` (its settings), 4 `hires` (its resolved
#: settings), 5 `guidance_end`, 6 `timestep_spacing`, 7 `deep_cache_interval`; an older payload is
#: read as one without them (guidance on every step, the model's own spacing, no deep cache). A
#: version a server does not know is refused by name rather than failing on an unknown field, when
#: an older server reads a newer job.
PAYLOAD_VERSION = 7
_READABLE_VERSIONS = (1, 2, 3, 4, 5, 6, 7)

_IMAGE_FIELDS = ("init_image", "mask_image")


@dataclass
class JobPayload:
    """What a job runs: engine requests (one per image) and how to encode the result."""

    requests: list[GenerationRequest]
    output_format: str = "png"
    output_compression: Optional[int] = None
    #: Always answer a ZIP with a manifest (the batch endpoint), even for one image.
    archive: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "version": PAYLOAD_VERSION,
            "requests": [_request_to_json(request) for request in self.requests],
            "output_format": self.output_format,
            "output_compression": self.output_compression,
            "archive": self.archive,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "JobPayload":
        if data.get("version") not in _READABLE_VERSIONS:
            raise ValueError(f"job payload version {data.get('version')!r} is not one of {_READABLE_VERSIONS}")
        return cls(
            requests=[_request_from_json(item) for item in data["requests"]],
            output_format=data["output_format"],
            output_compression=data["output_compression"],
            archive=data["archive"],
        )


def _request_to_json(request: GenerationRequest) -> dict[str, Any]:
    # `handoff` is the refiner stage's input, made while a job runs: never stored.
    data = request.model_dump(mode="json", exclude={*_IMAGE_FIELDS, "controlnets", "handoff"})
    for name in _IMAGE_FIELDS:
        pixels = getattr(request, name)
        data[name] = None if pixels is None else png_base64(pixels)
    # Only the settings a request gave: defaults stay defaults, and a threshold stays "not given".
    data["controlnets"] = [
        {**control.model_dump(mode="json", exclude={"image"}, exclude_unset=True), "image": png_base64(control.image)}
        for control in request.controlnets
    ]
    return data


def _request_from_json(data: dict[str, Any]) -> GenerationRequest:
    # Stored before version 7, a request ran every step whole; absent now, the interval would be
    # the serving deployment's default.
    data = {"deep_cache_interval": 1, **data}
    images = {name: None if data.get(name) is None else png_pixels(data[name]) for name in _IMAGE_FIELDS}
    controlnets = [{**control, "image": png_pixels(control["image"])} for control in data.get("controlnets", [])]
    return GenerationRequest.model_validate({**data, **images, "controlnets": controlnets})


def png_base64(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=COMPRESS_LEVEL)  # Pillow: masks are (H, W)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def png_pixels(text: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(text))) as image:
        return np.asarray(image).copy()
