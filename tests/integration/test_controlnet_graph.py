"""The graph grows by registry: the default config starts one deployment per ControlNet variant
and the refiner beside the base (Serve's own status says so), requests with a ControlNet reach
their variant, refined requests pass through the base and the refiner (over HTTP and chained
handles), and a plain request touches only the base."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.integration


def _map() -> str:
    edges = np.zeros((64, 64, 3), dtype=np.uint8)
    edges[16:48, 16] = edges[16:48, 47] = edges[16, 16:48] = edges[47, 16:48] = 255
    buffer = io.BytesIO()
    Image.fromarray(edges).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _completed(handle) -> int:
    return handle.stats.remote().result()["completed"]


def test_each_variant_is_a_deployment_of_its_own(served):
    from ray import serve

    deployments = serve.status().applications[served.app_name].deployments
    assert {name: str(d.status.value) for name, d in deployments.items()} == {
        "ImageIngress": "HEALTHY",
        "JobManager": "HEALTHY",
        "SDXLBase": "HEALTHY",
        "SDXLControlNet-canny": "HEALTHY",
        "SDXLControlNet-silhouette": "HEALTHY",
        "SDXLRefiner": "HEALTHY",
    }


def test_requests_reach_the_engine_they_need(served, http):
    from ray import serve

    base = serve.get_deployment_handle("SDXLBase", app_name=served.app_name)
    canny = serve.get_deployment_handle("SDXLControlNet-canny", app_name=served.app_name)
    small = {"prompt": "a red square", "width": 64, "height": 64, "num_inference_steps": 2}
    before = _completed(base), _completed(canny)
    assert http.post("/v1/txt2img", json=small).status_code == 200
    assert (_completed(base) - before[0], _completed(canny) - before[1]) == (1, 0)
    steered = http.post("/v1/txt2img", json={**small, "controlnet": {"name": "canny", "image": _map()}})
    assert steered.status_code == 200, steered.text
    assert (_completed(base) - before[0], _completed(canny) - before[1]) == (1, 1)
    listed = {item["name"]: item["deployment"] for item in http.get("/v1/controlnets").json()["data"]}
    assert listed == {"canny": "SDXLControlNet-canny", "silhouette": "SDXLControlNet-silhouette"}


def test_a_refined_request_passes_through_base_and_refiner(served, http):
    from ray import serve

    from deployments.types import GenerationRequest, GenerationResult, RefinerSettings

    base = serve.get_deployment_handle("SDXLBase", app_name=served.app_name)
    refiner = serve.get_deployment_handle("SDXLRefiner", app_name=served.app_name)
    small = {"prompt": "a red square", "width": 64, "height": 64, "num_inference_steps": 4}
    before = _completed(base), _completed(refiner)
    assert http.post("/v1/txt2img", json=small).status_code == 200
    assert (_completed(base) - before[0], _completed(refiner) - before[1]) == (1, 0)
    refined = http.post("/v1/txt2img", json={**small, "refiner": {"mode": "ensemble", "switch_at": 0.5}})
    assert refined.status_code == 200, refined.text
    assert (_completed(base) - before[0], _completed(refiner) - before[1]) == (2, 1)
    # From a Ray app: the base's response passed to the refiner as it is.
    request = GenerationRequest(**small, seed=1, refiner=RefinerSettings(mode="post"))
    result = refiner.generate.remote(request, base.generate.remote(request)).result()
    assert isinstance(result, GenerationResult) and result.image.shape == (64, 64, 3)
    assert (_completed(base) - before[0], _completed(refiner) - before[1]) == (3, 2)
