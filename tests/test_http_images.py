"""The HTTP API in-process over the real engine on the tiny model (no Ray): images, the validation
envelope, concurrent requests sharing forwards."""

import base64
import io
import json
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

from tests.app_config import MAX_BATCH
from tests.fakes import post_concurrently


SMALL = {"size": "64x64", "num_inference_steps": 2}


def _decode_b64(item: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB"))


def _generate(http, **body) -> dict:
    response = http.post("/v1/images/generations", json={"prompt": "a red circle", **SMALL, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_generations_returns_n_images_of_the_requested_size_with_seeds(http):
    body = _generate(http, n=3, seed=41, size="64x96")
    assert body["size"] == "64x96" and body["output_format"] == "png" and body["model"] == "sdxl-tiny"
    assert [item["seed"] for item in body["data"]] == [41, 42, 43]
    images = [_decode_b64(item) for item in body["data"]]
    assert all(image.shape == (96, 64, 3) for image in images)
    assert np.abs(images[0].astype(int) - images[1].astype(int)).max() > 0  # different seeds differ


def test_same_seed_gives_the_same_image(http):
    first, again = (_decode_b64(_generate(http, seed=7)["data"][0]) for _ in range(2))
    assert np.array_equal(first, again)


def test_seed_is_drawn_when_absent_and_reproduces(http):
    item = _generate(http)["data"][0]
    assert 0 <= item["seed"] < 2**32
    assert np.array_equal(_decode_b64(item), _decode_b64(_generate(http, seed=item["seed"])["data"][0]))


def test_model_default_size_when_absent(http):
    body = _generate(http, size=None)
    assert body["size"] == "128x128" and _decode_b64(body["data"][0]).shape == (128, 128, 3)


@pytest.mark.parametrize("fmt, pil_format", [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_formats(http, fmt, pil_format):
    body = _generate(http, output_format=fmt, output_compression=80)
    image = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))
    assert image.format == pil_format and body["output_format"] == fmt


def test_txt2img_answers_png_bytes_matching_the_openai_endpoint(http):
    response = http.post(
        "/v1/txt2img",
        json={"prompt": "a red circle", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 99},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png" and response.headers["x-seed"] == "99"
    png = Image.open(io.BytesIO(response.content))
    assert png.format == "PNG" and png.size == (64, 64)
    same = _decode_b64(_generate(http, seed=99)["data"][0])
    assert np.array_equal(np.asarray(png.convert("RGB")), same)


def test_txt2img_jpeg(http):
    response = http.post("/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64, "output_format": "jpeg"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(response.content)).format == "JPEG"


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/v1/images/generations", {"prompt": ""}, 400, "prompt"),
        ("/v1/images/generations", {"prompt": "x" * 4001}, 400, "prompt"),
        ("/v1/images/generations", {}, 400, "prompt"),
        ("/v1/images/generations", {"prompt": "x", "size": "65x64"}, 400, "size"),
        ("/v1/images/generations", {"prompt": "x", "size": "big"}, 400, "size"),
        ("/v1/images/generations", {"prompt": "x", "size": "4096x4096"}, 400, "size"),
        ("/v1/images/generations", {"prompt": "x", "size": "32x64"}, 400, "size"),
        ("/v1/images/generations", {"prompt": "x", "n": 0}, 400, "n"),
        ("/v1/images/generations", {"prompt": "x", "n": 11}, 400, "n"),
        ("/v1/images/generations", {"prompt": "x", "num_inference_steps": 151}, 400, "num_inference_steps"),
        ("/v1/images/generations", {"prompt": "x", "num_inference_steps": 0}, 400, "num_inference_steps"),
        ("/v1/images/generations", {"prompt": "x", "guidance_scale": -1}, 400, "guidance_scale"),
        ("/v1/images/generations", {"prompt": "x", "guidance_end": 0}, 400, "guidance_end"),
        ("/v1/images/generations", {"prompt": "x", "guidance_end": 1.5}, 400, "guidance_end"),
        ("/v1/txt2img", {"prompt": "x", "guidance_scale": 1, "guidance_end": 0.5}, 400, "guidance_end"),
        ("/v1/txt2img", {"prompt": "x", "guidance_end": 0.5, "refiner": {"mode": "post"}}, 400, "guidance_end"),
        ("/v1/jobs", {"kind": "txt2img", "params": {"prompt": "x", "guidance_end": -1}}, 400, "params.guidance_end"),
        ("/v1/images/generations", {"prompt": "x", "scheduler": "warp"}, 400, "scheduler"),
        ("/v1/images/generations", {"prompt": "x", "seed": -5}, 400, "seed"),
        ("/v1/images/generations", {"prompt": "x", "output_format": "gif"}, 400, "output_format"),
        ("/v1/images/generations", {"prompt": "x", "output_compression": 50}, 400, "output_compression"),
        ("/v1/images/generations", {"prompt": "x", "response_format": "file"}, 400, "response_format"),
        ("/v1/images/generations", {"prompt": "x", "quality": "hd"}, 400, "quality"),
        ("/v1/images/generations", {"prompt": "x", "model": "dall-e-3"}, 404, "model"),
        ("/v1/txt2img", {"prompt": "x", "width": 100}, 400, "width"),
        ("/v1/txt2img", {"prompt": "x", "height": 20000, "width": 64}, 400, "height"),
        ("/v1/txt2img", {"prompt": "x", "width": 2048, "height": 4096}, 400, "width"),
    ],
)
def test_bad_input_gets_4xx_envelope_naming_the_field(http, path, body, status, param):
    response = http.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert error["message"] and "Traceback" not in response.text


def test_guidance_end_reaches_the_engine_and_the_batch_manifest_echoes_it(http):
    """Ending guidance early changes the image (so the field reached the engine); a batch's
    manifest echoes it beside the image it made, which equals the sync call's."""
    shared = {"width": 64, "height": 64, "num_inference_steps": 4, "seed": 5}
    body = {"prompt": "a red star", **shared}
    early, ordinary = [http.post("/v1/txt2img", json={**body, **extra}) for extra in ({"guidance_end": 0.3}, {})]
    assert early.status_code == ordinary.status_code == 200, early.text
    early_pixels = np.asarray(Image.open(io.BytesIO(early.content)).convert("RGB"))
    assert np.abs(early_pixels.astype(int) - np.asarray(Image.open(io.BytesIO(ordinary.content)).convert("RGB")).astype(int)).max() > 0
    batch = http.post("/v1/images/batch", json={"prompts": [body["prompt"]], "params": {**shared, "guidance_end": 0.3}})
    assert batch.status_code == 200, batch.text
    archive = zipfile.ZipFile(io.BytesIO(batch.content))
    (entry,) = json.loads(archive.read("manifest.json"))["images"]
    assert entry["guidance_end"] == 0.3
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(archive.read(entry["file"]))).convert("RGB")), early_pixels)


def test_malformed_json_is_400(http):
    response = http.post(
        "/v1/images/generations", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("method, path, status", [("GET", "/v1/nope", 404), ("GET", "/v1/images/generations", 405)])
def test_routing_errors_use_the_envelope(http, method, path, status):
    response = http.request(method, path)
    assert response.status_code == status and set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_models_lists_the_served_model(http):
    body = http.get("/v1/models").json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["sdxl-tiny"]


def test_healthz_reports_the_loaded_model(http):
    response = http.get("/healthz")
    assert response.status_code == 200
    assert response.json()["model"]["id"] == "sdxl-tiny" and response.json()["model"]["device"] == "cpu"


def test_openapi_docs(http):
    assert http.get("/docs").status_code == 200
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/v1/images/generations", "/v1/txt2img", "/v1/models", "/healthz"} <= set(paths)


def _mixed_bodies() -> list[dict]:
    """Eight requests in two compatibility groups, each with its own prompt, negative and seed."""
    return [
        {
            "prompt": f"shape number {i}",
            "negative_prompt": None if i % 3 == 0 else f"noise {i}",
            "seed": 500 + i,
            "size": "64x64",
            "num_inference_steps": 2,
            "scheduler": "Euler a" if i % 2 else "DDIM",
        }
        for i in range(8)
    ]


def test_concurrent_requests_share_forwards_and_match_sequential_images(local_server, http):
    bodies = _mixed_bodies()
    sequential = [_decode_b64(_generate(http, **body)["data"][0]) for body in bodies]

    before = local_server.replica.stats()
    responses = post_concurrently(local_server, "/v1/images/generations", bodies)
    after = local_server.replica.stats()

    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert after["admitted"] - before["admitted"] == len(bodies)
    shared = after["rows_per_forward"][len(before["rows_per_forward"]) :]
    assert max(shared) > 1 and max(shared) <= MAX_BATCH
    for body, alone, together in zip(bodies, sequential, responses):
        assert together.json()["data"][0]["seed"] == body["seed"]
        fused = _decode_b64(together.json()["data"][0])
        # fp32 sums in another order differ by ~1e-6; rounding to uint8 can move a pixel by one.
        assert np.abs(fused.astype(int) - alone.astype(int)).max() <= 1
        assert np.mean(fused != alone) < 0.01


def test_txt2img_tells_how_many_requests_shared_its_forwards(local_server):
    body = {"prompt": "a blue star", "width": 64, "height": 64, "num_inference_steps": 2}
    responses = post_concurrently(local_server, "/v1/txt2img", [{**body, "seed": i} for i in range(4)])
    assert all(r.status_code == 200 for r in responses)
    sizes = [int(r.headers["x-batch-size"]) for r in responses]
    assert all(1 <= size <= 4 for size in sizes) and max(sizes) > 1


@pytest.mark.parametrize("response_format", [None, "b64_json"])
def test_txt2img_server_timing_splits_the_latency(http, response_format):
    body = {"prompt": "a blue star", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 3}
    if response_format:
        body["response_format"] = response_format
    started = time.perf_counter()
    response = http.post("/v1/txt2img", json=body)
    latency_ms = (time.perf_counter() - started) * 1e3
    assert response.status_code == 200
    timing = dict(part.strip().split(";dur=") for part in response.headers["server-timing"].split(","))
    assert set(timing) == {"decode", "queue", "run", "encode", "total"}
    durations = {name: float(ms) for name, ms in timing.items()}
    assert durations["run"] > 0 and durations["encode"] > 0 and durations["queue"] >= 0
    parts = sum(durations[name] for name in ("decode", "queue", "run", "encode"))
    assert abs(parts - durations["total"]) < 5 and durations["total"] < latency_ms


def test_n_images_share_their_forwards(local_server, http):
    before = local_server.replica.stats()
    _generate(http, n=4, seed=1)
    after = local_server.replica.stats()
    assert after["admitted"] - before["admitted"] == 4
    assert max(after["rows_per_forward"][len(before["rows_per_forward"]) :]) == 4


def test_default_model_draws_the_requested_colours_and_shapes(local_server):
    """`serve run` as shipped: held-out captions at the model's defaults (size, steps, guidance)
    come back in the named colours, recognisably shaped."""
    import torch

    from training import judge, shapes

    scene = shapes.sample_scenes(6, torch.Generator().manual_seed(5), held_out=True)
    bodies = [{"prompt": shapes.caption(scene, i), "seed": i} for i in range(len(scene))]
    images = []
    for response in post_concurrently(local_server, "/v1/images/generations", bodies):  # rows equal their solo images
        assert response.status_code == 200, response.text
        images.append(torch.from_numpy(_decode_b64(response.json()["data"][0]).copy()).permute(2, 0, 1) / 255)
    batch = torch.stack(images)
    foreground, background = judge.dominant_colours(batch)
    assert (foreground == scene.colour).sum() >= 5 and (background == scene.background).sum() >= 5
    assert (judge.classify_shapes(batch) == scene.shape).sum() >= 3
