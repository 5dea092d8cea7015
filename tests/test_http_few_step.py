"""Few-step settings at the doors (no Ray): `timestep_spacing` in the contract and the HTTP
schemas (400s naming the field and quoting the value), the step limit of LCM and TCD, the job
payload keeping the field, and the in-process app over the real engine on the tiny model passing
it through to the image (sync, OpenAI extra, jobs, batch manifest)."""

import base64
import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from configs.model_spec import TinySpec
from deployments.types import GenerationRequest, HiresSettings, InvalidRequestError, RefinerSettings
from serve_app.jobs.payload import PAYLOAD_VERSION, JobPayload
from tests.fakes import decoded_rgb, finished_job, txt2img_rgb

SPEC = TinySpec(device="cpu")
SMALL = {"width": 64, "height": 64, "num_inference_steps": 4, "guidance_scale": 1.0, "seed": 3}


# --- the contract -------------------------------------------------------------------------------


def test_an_unknown_spacing_is_refused_quoting_it():
    with pytest.raises(ValidationError, match=r"unknown timestep_spacing 'Trailing'; use one of 'leading', 'trailing', 'linspace'"):
        GenerationRequest(prompt="p", timestep_spacing="Trailing")


def test_spacing_stays_absent_when_resolved_and_is_kept_when_given():
    assert GenerationRequest(prompt="p").with_defaults(SPEC).timestep_spacing is None  # the model's own config
    assert GenerationRequest(prompt="p", timestep_spacing="trailing").with_defaults(SPEC).timestep_spacing == "trailing"


@pytest.mark.parametrize("scheduler", ["lcm", "tcd", "LCM"])
def test_distilled_schedulers_take_at_most_their_schedule_of_steps(scheduler):
    assert GenerationRequest(prompt="p", scheduler=scheduler, num_inference_steps=50).with_defaults(SPEC).scheduler in ("lcm", "tcd")
    with pytest.raises(InvalidRequestError, match=r"num_inference_steps 51 is above the 50 steps") as error:
        GenerationRequest(prompt="p", scheduler=scheduler, num_inference_steps=51).with_defaults(SPEC)
    assert error.value.param == "num_inference_steps" and error.value.status_code == 400


@pytest.mark.parametrize("scheduler", ["lcm", "TCD"])
def test_distilled_schedulers_refuse_a_spacing_rather_than_ignore_it(scheduler):
    with pytest.raises(InvalidRequestError, match=r"timestep_spacing 'trailing' does not apply to scheduler") as error:
        GenerationRequest(prompt="p", scheduler=scheduler, timestep_spacing="trailing").with_defaults(SPEC)
    assert error.value.param == "timestep_spacing" and error.value.status_code == 400
    lcm_model = TinySpec(device="cpu", default_scheduler="lcm")  # the model's default counts too
    with pytest.raises(InvalidRequestError):
        GenerationRequest(prompt="p", timestep_spacing="leading").with_defaults(lcm_model)


def test_the_step_limit_applies_to_the_default_scheduler_and_each_pass():
    lcm_model = TinySpec(device="cpu", default_scheduler="lcm")
    with pytest.raises(InvalidRequestError) as error:
        GenerationRequest(prompt="p", num_inference_steps=60).with_defaults(lcm_model)
    assert error.value.param == "num_inference_steps"
    with pytest.raises(InvalidRequestError) as error:
        GenerationRequest(prompt="p", scheduler="lcm", num_inference_steps=8, hires=HiresSettings(steps=80)).with_defaults(SPEC)
    assert error.value.param == "hires.steps"
    with pytest.raises(InvalidRequestError) as error:
        GenerationRequest(prompt="p", scheduler="tcd", num_inference_steps=8, refiner=RefinerSettings(steps=70)).with_defaults(SPEC)
    assert error.value.param == "refiner.steps"
    assert GenerationRequest(prompt="p", scheduler="euler", num_inference_steps=60).with_defaults(SPEC).num_inference_steps == 60


def test_a_job_payload_keeps_the_spacing_and_reads_older_payloads_without_it():
    request = GenerationRequest(prompt="p", scheduler="euler", timestep_spacing="trailing", **SMALL).with_defaults(SPEC)
    stored = JobPayload([request]).to_json()
    assert stored["version"] == PAYLOAD_VERSION == 7
    assert JobPayload.from_json(json.loads(json.dumps(stored))).requests[0].timestep_spacing == "trailing"
    older = {**stored, "version": 5, "requests": [{k: v for k, v in stored["requests"][0].items() if k != "timestep_spacing"}]}
    assert JobPayload.from_json(older).requests[0].timestep_spacing is None


# --- HTTP, in-process over the tiny engine ---------------------------------------------------------


def _txt2img(http, **fields) -> np.ndarray:
    return txt2img_rgb(http, {"prompt": "a red star", **SMALL, **fields})


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/txt2img", {"prompt": "x", "timestep_spacing": "trailng"}, "timestep_spacing"),
        ("/v1/images/generations", {"prompt": "x", "timestep_spacing": "trailng"}, "timestep_spacing"),
        ("/v1/jobs", {"kind": "txt2img", "params": {"prompt": "x", "timestep_spacing": "trailng"}}, "params.timestep_spacing"),
        ("/v1/images/batch", {"prompts": ["x"], "params": {"timestep_spacing": "trailng"}}, "params.timestep_spacing"),
        ("/v1/txt2img", {"prompt": "x", "scheduler": "lcm", "num_inference_steps": 51}, "num_inference_steps"),
    ],
)
def test_bad_few_step_settings_get_a_400_naming_the_field(http, path, body, param):
    response = http.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    if "timestep_spacing" in body or "timestep_spacing" in body.get("params", {}):
        assert "'trailng'" in error["message"]


def test_img2img_form_refuses_an_unknown_spacing(http):
    image = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(image, format="PNG")
    response = http.post(
        "/v1/img2img", data={"prompt": "x", "timestep_spacing": "sideways"}, files={"image": ("a.png", image.getvalue(), "image/png")}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "timestep_spacing" and "'sideways'" in response.json()["error"]["message"]


def test_the_spacing_reaches_the_engine_through_every_door(http):
    """Trailing changes the image; the OpenAI extra, a job and a batch give the sync call's image
    for the same settings, and the batch's manifest echoes the spacing."""
    trailing = _txt2img(http, scheduler="euler", timestep_spacing="trailing")
    assert np.abs(trailing.astype(int) - _txt2img(http, scheduler="euler").astype(int)).max() > 0

    generated = http.post(
        "/v1/images/generations",
        json={"prompt": "a red star", "size": "64x64", "num_inference_steps": 4, "guidance_scale": 1.0, "seed": 3,
              "scheduler": "euler", "timestep_spacing": "trailing"},
    )
    assert generated.status_code == 200, generated.text
    assert np.array_equal(decoded_rgb(base64.b64decode(generated.json()["data"][0]["b64_json"])), trailing)

    params = {"prompt": "a red star", **SMALL, "scheduler": "euler", "timestep_spacing": "trailing"}
    job = http.post("/v1/jobs", json={"kind": "txt2img", "params": params})
    assert job.status_code == 202, job.text
    view = finished_job(http, job.json()["id"])
    assert view["status"] == "succeeded", view
    assert np.array_equal(decoded_rgb(http.get(f"/v1/jobs/{view['id']}/result").content), trailing)

    batch = http.post("/v1/images/batch", json={"prompts": ["a red star"], "params": {k: v for k, v in params.items() if k != "prompt"}})
    assert batch.status_code == 200, batch.text
    archive = zipfile.ZipFile(io.BytesIO(batch.content))
    (entry,) = json.loads(archive.read("manifest.json"))["images"]
    assert entry["timestep_spacing"] == "trailing" and entry["scheduler"] == "euler"
    assert np.array_equal(decoded_rgb(archive.read(entry["file"])), trailing)


@pytest.mark.parametrize("scheduler", ["lcm", "TCD"])
def test_distilled_schedulers_answer_over_http(http, scheduler):
    image = _txt2img(http, scheduler=scheduler)
    assert image.shape == (64, 64, 3)
    assert not np.array_equal(image, _txt2img(http, scheduler="euler"))  # the scheduler reached the engine
