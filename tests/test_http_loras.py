"""LoRAs over HTTP, in-process over the real engine on the tiny model (no Ray): the registry's
routes, refusals in the envelope, and what a LoRA does to the images of every door."""

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests import lora_files
from tests.fakes import decoded_rgb, post_concurrently, txt2img_rgb


def _txt2img(http, **body) -> np.ndarray:
    return txt2img_rgb(http, {"prompt": "a large red circle on a blue background", "seed": 4, **body})


def _upload(http, path, name=None, file_name=None):
    data = {"name": name} if name else {}
    return http.post("/v1/loras", data=data, files={"file": (file_name or path.name, path.read_bytes(), "application/octet-stream")})


def test_the_shipped_lora_is_listed_and_fits(http):
    listed = {item["name"]: item for item in http.get("/v1/loras").json()["data"]}
    pastel = listed["pastel"]
    assert pastel["builtin"] and pastel["fits"] and pastel["format"] == "diffusers"
    assert pastel["rank"] == 8 and pastel["components"] == ["unet"] and pastel["bytes"] > 0


def test_pastel_lowers_saturation_and_weight_zero_is_the_base_image(local_server, http):
    """The README's table: the pastel LoRA takes the saturation down; weight 0 and no LoRA give
    the base image exactly."""
    from training import judge

    prompts = ["a large red circle on a blue background", "a large yellow square on a purple background",
               "a large green star on a black background", "a large blue triangle on a white background"]
    # The bit-for-bit pair alone, one after the other; the images only measured, all at once.
    first = _txt2img(http, prompt=prompts[0])
    zero = _txt2img(http, prompt=prompts[0], loras=[{"name": "pastel", "weight": 0}])
    bodies = [{"prompt": p, "seed": 4} for p in prompts[1:]] + [{"prompt": p, "seed": 4, "loras": [{"name": "pastel"}]} for p in prompts]
    responses = post_concurrently(local_server, "/v1/txt2img", bodies)
    assert all(response.status_code == 200 for response in responses), [r.text for r in responses]
    drawn = [decoded_rgb(response.content) for response in responses]
    plain, pastel = [first, *drawn[: len(prompts) - 1]], drawn[len(prompts) - 1 :]

    def saturation(images):
        return judge.saturation(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255).mean().item()

    assert saturation(pastel) <= saturation(plain) - 0.2
    assert np.array_equal(zero, plain[0])


def test_every_door_takes_loras(http):
    # Few steps: each door only has to carry the LoRA to the engine, and the doors' images of one
    # request must be the same image.
    fast = {"prompt": "a large red circle on a blue background", "seed": 4, "num_inference_steps": 4}
    pastel = [{"name": "pastel", "weight": 0.8}]
    base = _txt2img(http, **fast)
    styled = _txt2img(http, **fast, loras=pastel)
    assert not np.array_equal(base, styled)
    generations = http.post("/v1/images/generations", json={**fast, "loras": pastel})
    assert np.array_equal(decoded_rgb(base64.b64decode(generations.json()["data"][0]["b64_json"])), styled)
    job = http.post("/v1/jobs", json={"kind": "txt2img", "params": {**fast, "loras": pastel}}).json()
    from tests.test_http_jobs import wait

    assert wait(http, job["id"])["status"] == "succeeded"
    assert np.array_equal(decoded_rgb(http.get(f"/v1/jobs/{job['id']}/result").content), styled)
    picture = io.BytesIO()
    Image.fromarray(base).save(picture, format="PNG")
    multipart = http.post(
        "/v1/img2img",
        data={"prompt": "pastel", "strength": "0.5", "seed": "1", "num_inference_steps": "4", "loras": json.dumps([{"name": "pastel"}])},
        files={"image": ("i.png", picture.getvalue(), "image/png")},
    )
    assert multipart.status_code == 200, multipart.text


@pytest.mark.parametrize(
    "loras, status, param, code",
    [
        ([{"name": "nope"}], 404, "loras.0.name", "lora_not_found"),
        ([{"name": "../secrets"}], 400, "loras.0.name", "string_pattern_mismatch"),
        ([{"name": "pastel", "weight": 9}], 400, "loras.0.weight", "less_than_equal"),
        ([{"name": f"l{i}"} for i in range(5)], 400, "loras", "too_many_loras"),
    ],
)
def test_bad_lora_requests_are_4xx_naming_the_field(http, loras, status, param, code):
    response = http.post("/v1/txt2img", json={"prompt": "x", "loras": loras})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == code


def test_upload_use_and_delete_without_a_restart(http, tmp_path, tiny_pipe):
    path = lora_files.attention_lora(tiny_pipe, tmp_path / "ink.safetensors")
    created = _upload(http, path)
    assert created.status_code == 201, created.text
    assert created.json()["name"] == "ink" and created.json()["fits"] and created.json()["rank"] == 4
    assert "ink" in [item["name"] for item in http.get("/v1/loras").json()["data"]]
    assert not np.array_equal(_txt2img(http, loras=[{"name": "ink"}], num_inference_steps=4), _txt2img(http, num_inference_steps=4))
    assert _upload(http, path).status_code == 409  # the name is taken
    assert http.delete("/v1/loras/ink").status_code == 200
    assert http.post("/v1/txt2img", json={"prompt": "x", "loras": [{"name": "ink"}]}).status_code == 404
    assert http.delete("/v1/loras/ink").status_code == 404


@pytest.mark.parametrize(
    "make, file_name, status, code",
    [
        (lora_files.wrong_model, "other.safetensors", 400, "lora_model_mismatch"),
        (lora_files.loha, "loha.safetensors", 400, "unsupported_lora_format"),
        (lora_files.checkpoint, "model.safetensors", 400, "not_a_lora"),
        (lambda path: path.write_bytes(b"garbage" * 100) and path, "junk.safetensors", 400, "invalid_lora_file"),
        (lambda path: path.write_bytes(b"\x80\x04K\x01."), "style.ckpt", 400, "unsupported_lora_format"),
        (lambda path: path.write_bytes(b"{}"), "style.txt", 400, "unsupported_lora_format"),
    ],
)
def test_uploads_that_are_not_loras_for_this_model_are_refused(http, tmp_path, make, file_name, status, code):
    path = tmp_path / file_name
    make(path)
    response = _upload(http, path)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code and "Traceback" not in response.text
    assert file_name.split(".")[0] not in [item["name"] for item in http.get("/v1/loras").json()["data"]]


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden"])
def test_upload_names_cannot_leave_the_folder(http, name):
    response = _upload(http, lora_files.PASTEL, name=name)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_lora_name"


def test_the_shipped_examples_cannot_be_deleted(http):
    response = http.delete("/v1/loras/pastel")
    assert response.status_code == 409 and response.json()["error"]["code"] == "lora_builtin"


def test_the_engine_reports_its_lora_cache(local_server, http):
    _txt2img(http, loras=[{"name": "pastel", "weight": 0.6}], num_inference_steps=2)
    _txt2img(http, loras=[{"name": "pastel", "weight": 0.6}], seed=5, num_inference_steps=2)
    loras = local_server.replica.stats()["loras"]
    assert loras["loads"] >= 1 and loras["hits"] >= 1 and {"pastel": 0.6} in loras["resident_sets"]
