"""The graph grows by registry: the default config starts one deployment per ControlNet variant
beside the base (Serve's own status says so), requests with a ControlNet reach it, and a base-only
request never does."""

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
