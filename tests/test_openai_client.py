"""The real `openai` Python client against the OpenAI-compatible endpoints, in-process over the
real engine on the tiny model (`tests/integration/test_cluster.py` runs it over a real server)."""

import base64
import io

import numpy as np
import openai
import pytest
from PIL import Image

@pytest.fixture(scope="module")
def client(local_server):
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key="not-needed", max_retries=0, timeout=120, http_client=local_server.client
    )


def test_images_generate_returns_decodable_images_of_the_requested_size(client):
    result = client.images.generate(
        model="sdxl-tiny",
        prompt="a red circle on a blue background",
        n=2,
        size="64x96",
        response_format="b64_json",
        extra_body={"seed": 1234, "num_inference_steps": 2, "negative_prompt": "blurry", "scheduler": "DPM++ 2M Karras"},
    )
    assert len(result.data) == 2
    for item in result.data:
        image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
        assert image.format == "PNG" and image.size == (64, 96)
    assert [item.model_extra["seed"] for item in result.data] == [1234, 1235]


def test_images_generate_takes_hires_as_an_extra_field(client):
    result = client.images.generate(
        prompt="a red circle on a blue background", size="64x64",
        extra_body={"seed": 3, "num_inference_steps": 2, "hires": {"scale": 1.5, "strength": 0.5, "steps": 2}},
    )
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert image.size == (96, 96) and result.size == "96x96"


def test_images_generate_with_output_format(client):
    result = client.images.generate(
        prompt="a green star", size="64x64", output_format="webp", output_compression=60,
        extra_body={"num_inference_steps": 2},
    )
    assert result.output_format == "webp"
    assert Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).format == "WEBP"


def test_images_generate_seed_is_deterministic(client):
    def one():
        item = client.images.generate(prompt="a tree", size="64x64", extra_body={"seed": 5, "num_inference_steps": 2}).data[0]
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(item.b64_json))))

    assert np.array_equal(one(), one())


def test_bad_request_surfaces_as_openai_error_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="x", size="63x64")
    assert info.value.status_code == 400
    assert info.value.body["param"] == "size"


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.images.generate(prompt="x", model="dall-e-3", size="64x64")
    assert info.value.body["code"] == "model_not_found"


def test_models_list(client):
    assert [m.id for m in client.models.list()] == ["sdxl-tiny"]
