"""ControlNets over HTTP, in process (no Ray): the default config's canny variant on a real tiny
engine replica of its own. The image follows the map (the README's edge-recall measure), requests
reach the variant's engine and base requests never do, the preprocessor endpoint shows the map,
and every mistake is a 400 naming the field."""

import base64
import io
import json
from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from deployments.canny import canny
from tests.fakes import decoded_rgb, post_concurrently
from training import judge, shapes
from training.evaluate import held_out_scenes

CANNY_ROLE = "controlnet:canny"
#: The silhouette variant's bar (README "ControlNets"): set from its measured score, well above chance.
IOU_WITH = 0.5


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _b64(pixels: np.ndarray) -> str:
    return base64.b64encode(_png(pixels)).decode()



def _completed(replica) -> int:
    return replica._engine.stats()["completed"]


def test_the_served_controlnets_are_listed(local_server):
    listed = local_server.client.get("/v1/controlnets").json()
    assert listed["data"] == [
        {"object": "controlnet", "name": name, "variant": name, "deployment": f"SDXLControlNet-{name}",
         "source": "tiny", "hosted_with": []}
        for name in ("canny", "silhouette")
    ]


#: Held-out scenes of the two measures below: their prompts leave out position and size, so only a
#: map can say where the shape goes and how large it is.
SCENES = 6


@pytest.fixture(scope="module")
def scene() -> shapes.Scene:
    return held_out_scenes(SCENES, seed=99)


def _bodies(scene: shapes.Scene, control: Callable[[int], dict] = lambda i: {}) -> list[dict]:
    return [
        {"prompt": shapes.caption(scene, i, with_size=False, with_position=False), "seed": i, "num_inference_steps": 20, **control(i)}
        for i in range(len(scene))
    ]


def _images(local_server, bodies: list[dict]) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1]: the bodies posted at once (rows equal their solo images)."""
    responses = post_concurrently(local_server, "/v1/txt2img", bodies)
    for response in responses:
        assert response.status_code == 200, response.text
    return torch.stack([torch.from_numpy(decoded_rgb(r.content).copy()).permute(2, 0, 1) for r in responses]).float() / 255


@pytest.fixture(scope="module")
def uncontrolled(local_server, scene) -> torch.Tensor:
    """The scene's images without a ControlNet: what both measures compare against (the same
    prompts and seeds, drawn once)."""
    return _images(local_server, _bodies(scene))


def _map_image(pixels: torch.Tensor) -> str:
    """A (H, W) map in {0, 1} as the base64 PNG a request carries."""
    grey = (pixels.numpy() * 255).astype(np.uint8)
    return _b64(np.repeat(grey[..., None], 3, 2))


def test_the_image_follows_a_control_map_the_prompt_does_not_describe(local_server, scene, uncontrolled):
    """The README's measure through HTTP: the map's edges found again (within 2 px) in the output,
    with the ControlNet and without it, prompts without position or size."""
    maps = canny(shapes.render(scene))  # (B, 1, 128, 128) in {0, 1}
    steered = _images(local_server, _bodies(scene, lambda i: {"controlnet": {"name": "canny", "image": _map_image(maps[i, 0])}}))
    recalls = {label: judge.edge_recall(canny(images), maps) for label, images in (("with", steered), ("without", uncontrolled))}
    with_control, without = recalls["with"].mean().item(), recalls["without"].mean().item()
    assert with_control >= 0.5 and with_control >= 2 * without, recalls


def test_the_image_fills_a_silhouette_the_prompt_does_not_describe(local_server, scene, uncontrolled):
    """The second variant's measure through HTTP: intersection over union of the silhouette map
    and the output's foreground, with the ControlNet and without it."""
    maps = shapes.silhouette(scene)  # (B, 1, 128, 128) in {0, 1}
    steered = _images(local_server, _bodies(scene, lambda i: {"controlnet": {"name": "silhouette", "image": _map_image(maps[i, 0])}}))
    ious = {label: judge.mask_iou(judge.foreground_mask(images), maps[:, 0] > 0) for label, images in (("with", steered), ("without", uncontrolled))}
    with_control, without = ious["with"].mean().item(), ious["without"].mean().item()
    assert with_control >= IOU_WITH and with_control >= 2 * without, ious


def test_controlnet_requests_reach_their_variant_and_base_requests_never_do(local_server):
    base, variant = local_server.replicas["base"], local_server.replicas[CANNY_ROLE]
    before = _completed(base), _completed(variant)
    edges = np.zeros((64, 64, 3), dtype=np.uint8)
    edges[16:48, 16] = 255
    small = {"prompt": "a red square", "num_inference_steps": 2, "width": 64, "height": 64}
    assert local_server.client.post("/v1/txt2img", json=small).status_code == 200
    steered = {**small, "controlnet": [{"name": "canny", "image": _b64(edges), "conditioning_scale": 0.5}]}
    response = local_server.client.post("/v1/txt2img", json=steered)
    assert response.status_code == 200, response.text
    assert (_completed(base) - before[0], _completed(variant) - before[1]) == (1, 1)


def test_a_control_image_sets_the_size_and_others_are_resized_to_it(local_server):
    picture = np.zeros((96, 64, 3), dtype=np.uint8)
    body = {"prompt": "a blue circle", "num_inference_steps": 2, "controlnet": {"name": "canny", "image": _b64(picture)}}
    assert decoded_rgb(local_server.client.post("/v1/txt2img", json=body).content).shape == (96, 64, 3)
    body["width"], body["height"] = 128, 128
    assert decoded_rgb(local_server.client.post("/v1/txt2img", json=body).content).shape == (128, 128, 3)


def test_the_openai_door_and_jobs_take_the_extra_field(local_server):
    control = {"name": "canny", "image": _b64(np.zeros((64, 64, 3), np.uint8)), "guidance_end": 0.5}
    response = local_server.client.post(
        "/v1/images/generations", json={"prompt": "a star", "size": "64x64", "num_inference_steps": 2, "controlnet": control}
    )
    assert response.status_code == 200, response.text
    job = local_server.client.post(
        "/v1/jobs", json={"kind": "txt2img", "params": {"prompt": "a star", "num_inference_steps": 2, "controlnet": control}}
    )
    assert job.status_code == 202, job.text
    assert local_server.client.get(f"/v1/jobs/{job.json()['id']}/result").status_code in (200, 409)


def test_img2img_multipart_takes_the_controlnet_as_a_json_part(local_server):
    picture = np.full((64, 64, 3), 200, dtype=np.uint8)
    control = json.dumps({"name": "canny", "image": _b64(picture), "preprocess": "canny", "low_threshold": 0.05})
    response = local_server.client.post(
        "/v1/img2img",
        data={"prompt": "a green triangle", "num_inference_steps": "2", "controlnet": control},
        files={"image": ("init.png", _png(picture), "image/png")},
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "control, param, code",
    [
        ({"name": "depth"}, "controlnet.0.name", "controlnet_not_found"),
        ({"name": "canny", "image": base64.b64encode(b"not an image").decode()}, "controlnet.0.image", None),
        ({"name": "canny", "low_threshold": 0.1}, "controlnet", "value_error"),
        ({"name": "canny", "guidance_start": 0.9, "guidance_end": 0.1}, "controlnet", "value_error"),
        ({"name": "canny", "preprocess": "depth"}, "controlnet.preprocess", "literal_error"),
        ([{"name": "canny"}] * 5, "controlnet", "too_long"),
        ([{"name": "canny"}] * 2, "controlnet", "value_error"),
    ],
    ids=["unknown", "undecodable", "thresholds-without-canny", "window", "preprocessor", "too-many", "twice"],
)
def test_mistakes_are_400s_naming_the_field(local_server, control, param, code):
    def filled(item: dict) -> dict:
        return {"image": _b64(np.zeros((64, 64, 3), np.uint8)), **item}

    control = [filled(item) for item in control] if isinstance(control, list) else filled(control)
    response = local_server.client.post("/v1/txt2img", json={"prompt": "a square", "controlnet": control})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error


def test_the_preprocess_endpoint_shows_the_map_the_service_follows(local_server):
    picture = np.zeros((64, 64, 3), dtype=np.uint8)
    picture[16:48, 16:48] = (220, 40, 40)
    response = local_server.client.post("/v1/controlnets/preprocess", json={"image": _b64(picture), "preprocess": "canny"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    edges = decoded_rgb(response.content)
    expected = canny(torch.from_numpy(picture).permute(2, 0, 1)[None].float() / 255)[0, 0].numpy()
    assert np.array_equal(edges[..., 0] > 0, expected > 0) and expected.sum() > 50
    form = local_server.client.post(
        "/v1/controlnets/preprocess", data={"preprocess": "canny"}, files={"image": ("p.png", _png(picture), "image/png")}
    )
    assert form.status_code == 200 and form.content == response.content
    refused = local_server.client.post("/v1/controlnets/preprocess", json={"image": _b64(picture), "preprocess": "depth"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "preprocess"
