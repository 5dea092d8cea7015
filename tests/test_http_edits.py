"""img2img, inpainting and OpenAI edits over HTTP, in-process over the real engine on the tiny
model (no Ray): JSON and multipart, the openai client, bad input."""

import base64
import io

import numpy as np
import openai
import pytest
from PIL import Image

from tests.fakes import decoded_rgb, post_concurrently


FAST = {"num_inference_steps": 4}


def _png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _picture(width=64, height=64, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def _mask(width=64, height=64) -> Image.Image:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    return Image.fromarray(mask)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()



def test_img2img_json_and_multipart_give_the_same_image(http):
    image = _png(_picture())
    as_json = http.post("/v1/img2img", json={"prompt": "a cat", "image": _b64(image), "strength": 0.5, "seed": 3, **FAST})
    as_form = http.post(
        "/v1/img2img",
        data={"prompt": "a cat", "strength": "0.5", "seed": "3", "num_inference_steps": "4"},
        files={"image": ("in.png", image, "image/png")},
    )
    assert as_json.status_code == 200, as_json.text
    assert as_form.status_code == 200, as_form.text
    assert as_json.headers["content-type"] == "image/png" and as_json.headers["x-seed"] == "3"
    assert np.array_equal(decoded_rgb(as_json.content), decoded_rgb(as_form.content))


def test_img2img_strength_is_applied(http):
    # With random weights the VAE alone scrambles the picture, so distance-from-source grows with
    # strength only once the model is trained; here: each strength gives its own image.
    image = _png(_picture(seed=5))

    def run(strength: float) -> np.ndarray:
        response = http.post("/v1/img2img", json={"prompt": "x", "image": _b64(image), "strength": strength, "seed": 1, **FAST})
        assert response.status_code == 200, response.text
        return decoded_rgb(response.content).astype(int)

    low, high = run(0.25), run(1.0)
    assert np.array_equal(low, run(0.25))
    assert np.abs(low - high).max() > 0


def test_img2img_size_comes_from_the_image_rounded_down(http):
    response = http.post("/v1/img2img", json={"prompt": "x", "image": _b64(_png(_picture(100, 70))), "seed": 1, **FAST})
    assert response.status_code == 200, response.text
    assert Image.open(io.BytesIO(response.content)).size == (96, 64)


def test_img2img_explicit_size_resizes_and_b64_json_form(http):
    response = http.post(
        "/v1/img2img",
        json={"prompt": "x", "image": _b64(_png(_picture())), "width": 128, "height": 64, "response_format": "b64_json", **FAST},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["size"] == "128x64"
    assert Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))).size == (128, 64)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_img2img_accepts_jpeg_and_webp(http, fmt):
    response = http.post("/v1/img2img", files={"image": ("in", _png(_picture(), fmt), f"image/{fmt.lower()}")}, data={"prompt": "x", **FAST})
    assert response.status_code == 200, response.text


def test_inpaint_keeps_the_unmasked_area_with_full_res_crop(http):
    source = _picture(seed=2)
    response = http.post(
        "/v1/inpaint",
        json={"prompt": "a red circle", "image": _b64(_png(source)), "mask": _b64(_png(_mask())), "padding_mask_crop": 4, "seed": 1, **FAST},
    )
    assert response.status_code == 200, response.text
    out = decoded_rgb(response.content).astype(int)
    keep = np.asarray(_mask()) == 0
    assert np.array_equal(out[keep], np.asarray(source).astype(int)[keep])
    assert np.abs(out[~keep] - np.asarray(source).astype(int)[~keep]).mean() > 5


def test_inpaint_multipart_with_blur(http):
    response = http.post(
        "/v1/inpaint",
        data={"prompt": "x", "mask_blur": "4", "strength": "0.9", **FAST},
        files={"image": ("i.png", _png(_picture()), "image/png"), "mask": ("m.png", _png(_mask()), "image/png")},
    )
    assert response.status_code == 200, response.text


def test_concurrent_inpaints_share_forwards(local_server):
    bodies = [
        {"prompt": f"p{i}", "image": _b64(_png(_picture(seed=i))), "mask": _b64(_png(_mask())), "seed": i, **FAST}
        for i in range(4)
    ]
    before = local_server.replica.stats()
    responses = post_concurrently(local_server, "/v1/inpaint", bodies)
    after = local_server.replica.stats()
    assert all(r.status_code == 200 for r in responses)
    assert after["admitted"] - before["admitted"] == 4
    assert max(after["rows_per_forward"][len(before["rows_per_forward"]) :]) > 1


@pytest.mark.parametrize(
    "path, kwargs, status, param",
    [
        ("/v1/img2img", {"json": {"prompt": "x"}}, 400, "image"),
        ("/v1/img2img", {"json": {"prompt": "x", "image": "%%%"}}, 400, "image"),
        ("/v1/img2img", {"json": {"prompt": "x", "image": _b64(b"not a picture")}}, 400, "image"),
        ("/v1/img2img", {"json": {"prompt": "x", "image": _b64(_png(_picture(), "GIF"))}}, 415, "image"),
        ("/v1/img2img", {"json": {"prompt": "x", "image": _b64(_png(_picture())), "strength": 1.5}}, 400, "strength"),
        ("/v1/img2img", {"json": {"prompt": "x", "image": _b64(_png(_picture())), "strength": 0}}, 400, "strength"),
        ("/v1/img2img", {"json": {"prompt": "x", "image": _b64(_png(_picture())), "width": 100, "height": 64}}, 400, "width"),
        ("/v1/img2img", {"json": {"prompt": "x", "image": _b64(_png(_picture())), "mask_blur": 3}}, 400, "mask_blur"),
        ("/v1/img2img", {"json": {"prompt": "x", "image": _b64(_png(_picture(40, 40)))}}, 400, "image"),
        ("/v1/img2img", {"content": b"prompt=x", "headers": {"content-type": "text/plain"}}, 415, None),
        ("/v1/img2img", {"data": {"prompt": "x"}, "files": {"image": ("a.txt", b"hello", "text/plain")}}, 415, "image"),
        ("/v1/inpaint", {"json": {"prompt": "x", "image": _b64(_png(_picture()))}}, 400, "mask"),
        ("/v1/inpaint", {"json": {"prompt": "x", "image": _b64(_png(_picture())), "mask": _b64(_png(_mask(64, 72)))}}, 400, "mask"),
        ("/v1/inpaint", {"json": {"prompt": "x", "image": _b64(_png(_picture())), "mask": _b64(_png(_mask())), "padding_mask_crop": -1}}, 400, "padding_mask_crop"),
    ],
)
def test_bad_uploads_answer_in_the_envelope(http, path, kwargs, status, param):
    response = http.post(path, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and "Traceback" not in response.text


def test_upload_over_the_limit_is_413(http):
    # The test app allows 20 MiB per image: declare a larger body and the server refuses it unread.
    huge = b"\x00" * (61 * 1024 * 1024 + 1)
    response = http.post("/v1/img2img", content=huge, headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"


# --- the OpenAI edits call ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(local_server):
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key="not-needed", max_retries=0, timeout=120, http_client=local_server.client
    )


def _transparent_mask(width=64, height=64) -> bytes:
    rgba = np.full((height, width, 4), 255, dtype=np.uint8)
    rgba[16:48, 16:48, 3] = 0  # fully transparent = edit here
    return _png(Image.fromarray(rgba))


def test_openai_edit_with_mask_changes_only_the_transparent_area(client):
    source = _picture(seed=7)
    result = client.images.edit(
        image=("in.png", _png(source), "image/png"),
        mask=("mask.png", _transparent_mask(), "image/png"),
        prompt="a green star",
        n=2,
        size="64x64",
        response_format="b64_json",
        extra_body={"seed": 11, "num_inference_steps": 4, "padding_mask_crop": 0},
    )
    assert [item.model_extra["seed"] for item in result.data] == [11, 12]
    out = decoded_rgb(base64.b64decode(result.data[0].b64_json)).astype(int)
    keep = np.ones((64, 64), dtype=bool)
    keep[16:48, 16:48] = False
    assert out.shape == (64, 64, 3)
    assert np.array_equal(out[keep], np.asarray(source).astype(int)[keep])


def test_openai_edit_without_mask_is_img2img(client):
    result = client.images.edit(
        image=("in.png", _png(_picture(seed=8)), "image/png"),
        prompt="make it blue",
        extra_body={"strength": 0.6, "num_inference_steps": 4, "seed": 1},
    )
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert image.size == (64, 64) and result.size == "64x64"


def test_openai_edit_uses_image_transparency_as_mask(client):
    rgba = np.concatenate([np.asarray(_picture(seed=9)), np.full((64, 64, 1), 255, np.uint8)], axis=2)
    rgba[0:32, :, 3] = 0
    result = client.images.edit(
        image=("in.png", _png(Image.fromarray(rgba)), "image/png"),
        prompt="sky",
        extra_body={**FAST, "padding_mask_crop": 0, "seed": 2},
    )
    out = decoded_rgb(base64.b64decode(result.data[0].b64_json)).astype(int)
    source = np.asarray(_picture(seed=9)).astype(int)
    assert np.array_equal(out[32:], source[32:])  # opaque rows are kept
    assert np.abs(out[:32] - 255).mean() > 5  # the transparent rows (flattened white) were repainted


def test_openai_edit_mask_without_transparency_is_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.images.edit(
            image=("in.png", _png(_picture()), "image/png"),
            mask=("mask.png", _png(_mask()), "image/png"),
            prompt="x",
        )
    assert info.value.body["param"] == "mask"


def test_openai_edit_mask_size_mismatch_is_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.images.edit(
            image=("in.png", _png(_picture()), "image/png"),
            mask=("mask.png", _transparent_mask(64, 80), "image/png"),
            prompt="x",
        )
    assert info.value.body["param"] == "mask"


def test_openai_edit_unsupported_option_is_rejected(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.images.edit(image=("in.png", _png(_picture()), "image/png"), prompt="x", extra_body={"quality": "hd"})
    assert info.value.body["param"] == "quality"
