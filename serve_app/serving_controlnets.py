"""Serving logic of the ControlNet endpoints: what is served, and the maps preprocessors make. No
HTTP and no torch here: the listing comes from the app's config, and maps are made by an engine."""

from typing import Any

from configs.app_args import AppArgs, controlnet_deployment_name
from deployments.types import ControlRef
from serve_app import image_inputs
from serve_app.encoding import encode_image
from serve_app.protocol import PreprocessRequest


class ControlNetServing:
    def __init__(self, args: AppArgs, engine: Any, call: Any):
        """`engine`: the base engine's handle (a preprocessor needs no ControlNet); `call`: how the
        app awaits a handle call (mapping Ray's failures to the envelope)."""
        self._args = args
        self._engine = engine
        self._call = call

    def list(self) -> dict[str, Any]:
        data = []
        for variant, config in (self._args.controlnets or {}).items():
            for name, spec in config.models.items():
                data.append(
                    {
                        "object": "controlnet",
                        "name": name,
                        "variant": variant,
                        "deployment": controlnet_deployment_name(variant),
                        "source": spec.source,
                        "hosted_with": sorted(set(config.models) - {name}),
                    }
                )
        return {"object": "list", "data": sorted(data, key=lambda item: item["name"])}

    async def preprocess(self, body: PreprocessRequest) -> bytes:
        """The map as PNG bytes, at the picture's size."""
        picture = image_inputs.open_image(body.image, "image", self._args.limits)
        pixels = image_inputs.rgb_pixels(picture, picture.size)
        # A ControlRef carries the settings to the engine; the name is not looked up for a map.
        control = ControlRef(
            name="preprocess",
            image=pixels,
            preprocess=body.preprocess,
            **body.model_dump(include={"low_threshold", "high_threshold"}, exclude_unset=True),
        )
        edges = await self._call(self._engine.control_map, control)
        return encode_image(edges, "png")
