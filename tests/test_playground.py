"""The browser playground (issue #22): its routes over HTTP, then the page in a real headless
Chromium (Debian's, driven by Playwright's Python package; `.ci/run` installs both, no browser is
downloaded) against the whole app on a real socket, over the in-process tiny-model engines and a
real job manager: txt2img with a moving progress bar and the seed shown, inpainting with a mask
painted with the mouse, a LoRA picked from the list, every numeric control bounded and explained as
the request schema states it (config.json's `fields`, checked against `/openapi.json`), the
advanced settings (and the server's 400s shown), cancel, a ControlNet map, a batch ZIP, and an API key kept in the tab's session. A
screenshot of the finished page is saved under `bench-out/playground/` (and as
`docs/playground.png` with `UPDATE_SCREENSHOT=1`).
"""

import asyncio
import base64
import contextlib
import io
import json
import os
import shutil
import threading
import time
import zipfile
from hashlib import sha256
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

from configs.app_args import AppArgs, AuthConfig, IngressConfig
from tests.app_config import free_port

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "bench-out" / "playground"
CHROMIUM = os.environ.get("PLAYGROUND_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
KEY = "playground-test-key"
#: Most seconds a browser step waits for the app (a tiny-model job takes well under one).
WAIT_MS = 60_000
#: How Chromium's console reports a response with an error status (then the status and its reason).
REFUSED_RESPONSE = "Failed to load resource: the server responded with a status of"


# -- the app on a real socket --------------------------------------------------------------------


@contextlib.contextmanager
def serving(config: AppArgs, replicas: dict):
    """`create_app(...)` under uvicorn on 127.0.0.1 over the engines `config` names (from
    `replicas`, role → engine), in a thread with its own event loop, on which the job manager is
    initialised (its loops live there); yields the base URL."""
    import uvicorn

    from serve_app.http_app import create_app
    from serve_app.jobs.manager import JobManager
    from tests.fakes import LocalHandle, engine_registry

    engines = engine_registry(config, replicas.__getitem__)
    port = free_port()
    loop = asyncio.new_event_loop()
    held: dict = {}
    ready = threading.Event()

    async def main():
        manager = JobManager.__new__(JobManager)  # its constructor is async, as in a replica
        await manager.__init__(engines, config.jobs.model_dump(), config.controlnet_roles())
        app = create_app(engines, LocalHandle(manager), config)
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=2)
        )
        held.update(server=server, manager=manager)
        ready.set()
        try:
            await server.serve()
        finally:
            for task in manager._loops:
                task.cancel()
            await asyncio.gather(*manager._loops, return_exceptions=True)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(60)
    deadline = time.time() + 60
    while not held["server"].started:
        assert time.time() < deadline and thread.is_alive(), "the app did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        held["server"].should_exit = True
        thread.join(15)


def _config(local_config: AppArgs, state_dir: Path, **update) -> AppArgs:
    """The session's app config (what the in-process engines were built from), its jobs in a
    folder of their own (another job manager may serve the session's)."""
    jobs = local_config.jobs.model_copy(
        update={"db_path": str(state_dir / "jobs.sqlite3"), "results_dir": str(state_dir / "results")}
    )
    return local_config.model_copy(update={"jobs": jobs, **update})


@pytest.fixture(scope="module")
def replicas(tiny_replica, tiny_controlnet_replicas, tiny_refiner_replica):
    """The session's in-process engine replicas by role: the base, the ControlNet variants, the refiner."""
    from deployments.types import BASE_ROLE, REFINER_ROLE

    return {BASE_ROLE: tiny_replica, **tiny_controlnet_replicas, REFINER_ROLE: tiny_refiner_replica}


@pytest.fixture(scope="module")
def app_url(replicas, local_config, tmp_path_factory):
    """The app with auth off and the playground at its default path: every engine served."""
    with serving(_config(local_config, tmp_path_factory.mktemp("playground-jobs")), replicas) as url:
        yield url


@pytest.fixture(scope="module")
def auth_url(replicas, local_config, tmp_path_factory):
    """The app with one API key, the playground at a path of two segments, and neither
    ControlNets nor a refiner."""
    auth = AuthConfig.model_validate(
        {"enabled": True, "keys": [{"name": "studio", "key_sha256": sha256(KEY.encode()).hexdigest()}]}
    )
    ingress = local_config.ingress.model_copy(update={"playground": "/ui/play"})
    state = tmp_path_factory.mktemp("playground-auth-jobs")
    config = _config(local_config, state, auth=auth, ingress=ingress, controlnets={}, refiner=False)
    with serving(config, replicas) as url:
        yield url


# -- routes ----------------------------------------------------------------------------------------


def test_the_playground_path_is_checked():
    assert IngressConfig().playground == "/playground"
    assert IngressConfig(playground="/ui/play").playground == "/ui/play"
    assert IngressConfig(playground=None).playground is None
    assert IngressConfig(playground=False).playground is None
    for bad in ("playground", "/", "/ui/", "/..", "/a/../b", "/v1/play", "/docs", "/healthz", "/a b", True):
        with pytest.raises(ValueError):
            IngressConfig(playground=bad)


def test_the_pages_are_served_open_and_outside_the_schema(app_url, auth_url):
    with httpx.Client(base_url=app_url, follow_redirects=False, timeout=30) as http:
        root = http.get("/")
        assert root.status_code == 307 and root.headers["location"] == "playground/"
        bare = http.get("/playground")
        assert bare.status_code == 307 and bare.headers["location"] == "playground/"
        page = http.get("/playground/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert page.headers["x-content-type-options"] == "nosniff"
        for name, media_type in (("app.js", "text/javascript"), ("style.css", "text/css"), ("index.html", "text/html")):
            assert http.get(f"/playground/{name}").headers["content-type"].startswith(media_type)
        assert http.get("/playground/missing.js").status_code == 404
        config = http.get("/playground/config.json").json()
        assert config["path"] == "/playground" and config["auth"] is False
        assert config["defaults"]["width"] == 128 and config["limits"]["max_steps"] == 150
        assert "dpmpp_2m_karras" in config["schedulers"]
        paths = http.get("/openapi.json").json()["paths"]
        assert not [path for path in paths if path == "/" or "playground" in path]
        # The advanced fields: the API's own schema of them (as a form states it: absent, not null).
        advanced = config["advanced"]
        assert advanced["timestep_spacing"]["enum"] == ["leading", "trailing", "linspace"]
        assert "default" not in advanced["timestep_spacing"]  # empty: the model's scheduler config
        end = advanced["guidance_end"]
        assert (end["exclusiveMinimum"], end["maximum"], end["default"]) == (0, 1, 1)
        assert "guidance_scale > 1" in end["description"]
        form = paths["/v1/img2img"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        cache = advanced["deep_cache_interval"]
        assert (cache["type"], cache["minimum"], cache["maximum"]) == ("integer", 1, 10)
        assert "default" not in cache  # empty: the deployment's default, which config.json's defaults state
        assert config["defaults"]["deep_cache_interval"] == 1
        assert advanced == {name: form["properties"][name] for name in ("timestep_spacing", "guidance_end", "deep_cache_interval")}
    with httpx.Client(base_url=auth_url, follow_redirects=False, timeout=30) as http:
        assert http.get("/").headers["location"] == "ui/play/"
        assert http.get("/ui/play").headers["location"] == "play/"
        assert http.get("/ui/play/").status_code == 200  # no key needed for the page
        assert http.get("/ui/play/app.js").status_code == 200
        assert http.get("/ui/play/config.json").json()["auth"] is True
        assert http.get("/playground/").status_code == 404
        assert http.get("/v1/loras").status_code == 401  # the API still is not open


#: The keywords of a field's schema the page follows: its bounds, type (integer: steps of one, or
#: `multipleOf`), default and description (the control's tooltip).
FOLLOWED = ("type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "default", "description")


def _followed(prop: dict) -> dict:
    """`FOLLOWED` of a property, from its non-null branch where it is nullable (a JSON body's)."""
    branches = [branch for branch in prop.get("anyOf", []) if branch.get("type") != "null"]
    merged = {**prop, **(branches[0] if len(branches) == 1 else {})}
    return {key: merged[key] for key in FOLLOWED if key in merged and merged[key] is not None}


def test_the_controls_bounds_are_the_served_schemas(app_url):
    """config.json's `fields`, the schema of each numeric control, state what `/openapi.json` states
    for the same request field; where the deployment bounds a field further, the served schema's
    bound is config.json's `limits` (what the page applies)."""
    with httpx.Client(base_url=app_url, timeout=30) as http:
        config = http.get("/playground/config.json").json()
        schema = http.get("/openapi.json").json()
    fields, limits = config["fields"], config["limits"]

    def form(route: str) -> dict:
        return schema["paths"][route]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]

    img2img, components = form("/v1/img2img"), schema["components"]["schemas"]
    served = {name: img2img[name] for name in ("width", "height", "num_inference_steps", "guidance_scale", "seed", "strength")}
    served |= {
        "n": components["Txt2ImgJob"]["properties"]["n"],  # POST /v1/jobs, which the page calls
        "mask_blur": form("/v1/inpaint")["mask_blur"],
        "loras.weight": img2img["loras"]["items"]["properties"]["weight"],
        **{f"controlnet.{name}": img2img["controlnet"]["properties"][name] for name in ("conditioning_scale", "guidance_start", "guidance_end")},
        **{f"refiner.{name}": img2img["refiner"]["properties"][name] for name in ("switch_at", "strength")},
        **{f"hires.{name}": components["HiresSettings"]["properties"][name] for name in ("scale", "strength")},
    }
    assert set(fields) == set(served)
    sides = {"minimum": limits["min_side"], "maximum": limits["max_side"]}
    deployment = {
        "width": sides,
        "height": sides,
        "num_inference_steps": {"maximum": limits["max_steps"]},
        "n": {"maximum": limits["max_n"]},
    }
    for name, prop in served.items():
        mine, theirs = _followed(fields[name]), _followed(prop)
        for key, limit in deployment.get(name, {}).items():
            assert theirs.pop(key) == limit, (name, key)  # the page takes these from `limits`
            mine.pop(key, None)
        if name in ("width", "height"):  # the served text states the deployment's sides
            assert f"{limits['min_side']} to {limits['max_side']}" in theirs.pop("description")
            mine.pop("description")
        assert mine == theirs, name
        assert fields[name].get("description"), name  # every control gets a tooltip
    # Spot checks of what the page applies (the browser test reads them back).
    assert (fields["guidance_scale"]["minimum"], fields["guidance_scale"]["maximum"]) == (0, 50)
    assert (fields["controlnet.conditioning_scale"]["maximum"], fields["hires.scale"]["exclusiveMinimum"]) == (4, 1)
    assert fields["controlnet.guidance_end"]["description"] != config["advanced"]["guidance_end"]["description"]


def test_the_page_loads_nothing_from_elsewhere():
    """No CDN, no external fonts: every URL in the page's files is relative or the API's."""
    import re

    from serve_app.playground_routes import STATIC_DIR

    for path in STATIC_DIR.iterdir():
        text = path.read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, flags=re.I), path.name
        assert "@import" not in text and "fonts." not in text, path.name


def test_the_playground_can_be_turned_off(tmp_path):
    from starlette.testclient import TestClient

    from serve_app.http_app import create_app
    from tests.fakes import FakeEngine, LocalHandle, engine_registry

    config = AppArgs.model_validate({"state_dir": str(tmp_path), "ingress": {"playground": None}}).with_state_paths()
    app = create_app(engine_registry(config, lambda role: FakeEngine()), LocalHandle(None), config)
    http = TestClient(app)
    assert http.get("/playground/").status_code == 404
    assert http.get("/", follow_redirects=False).status_code == 404


def test_the_static_files_ship_in_the_package():
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["serve_app"]
    from serve_app.playground_routes import STATIC_DIR

    shipped = {path.name for pattern in data for path in STATIC_DIR.parent.glob(pattern)}
    assert shipped == {path.name for path in STATIC_DIR.iterdir()} == {"index.html", "app.js", "style.css"}


# -- the page in Chromium ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM} (.ci/run installs Debian's: apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser):
    """Open a fresh page (its own context: its own sessionStorage); console errors, page errors
    and failed requests are collected, and none may happen."""
    contexts, problems = [], []

    def open_(url: str, width: int = 1280, height: int = 900, refused: tuple[int, ...] = ()):
        """`refused`: the HTTP statuses the test expects the API to answer with (Chromium logs
        each such response as a console error)."""
        context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        expected = tuple(f"{REFUSED_RESPONSE} {status} " for status in refused)
        page.on(
            "console",
            lambda message: message.type == "error"
            and not message.text.startswith(expected)
            and problems.append(f"console: {message.text}"),
        )
        page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
        page.on("requestfailed", lambda request: problems.append(f"request failed: {request.url} {request.failure}"))
        page.goto(url)
        page.wait_for_selector("body[data-ready=true]")
        return page

    yield open_
    for context in contexts:
        context.close()
    assert problems == []


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _star_picture(size: int = 128) -> bytes:
    """A yellow star on purple, as the tiny world draws them: a picture to make a canny map of."""
    picture = Image.new("RGB", (size, size), (120, 50, 170))
    centre, outer, inner = size / 2, size * 0.3, size * 0.3 * 0.45
    points = []
    for k in range(10):
        radius = outer if k % 2 == 0 else inner
        angle = np.pi / 2 + k * np.pi / 5
        points.append((centre + radius * np.cos(angle), centre - radius * np.sin(angle)))
    ImageDraw.Draw(picture).polygon(points, fill=(240, 220, 40))
    return _png(picture)


def _job_bodies(page) -> list:
    """The JSON bodies of the page's `POST /v1/jobs` requests, as they are sent."""
    bodies: list = []
    page.on(
        "request",
        lambda request: request.method == "POST" and request.url.endswith("/v1/jobs") and bodies.append(json.loads(request.post_data)),
    )
    return bodies


def _settings(page, **values) -> None:
    for field, value in values.items():
        page.fill(f"#{field}", str(value))


def _record_progress(page) -> None:
    """Note every value the progress bar takes (from here on) in `window.progressSeen`."""
    page.evaluate(
        """() => {
            window.progressSeen = [];
            const bar = document.getElementById("progress");
            new MutationObserver(() => window.progressSeen.push(Number(bar.value)))
                .observe(bar, {attributes: true, attributeFilter: ["value"]});
        }"""
    )


def _until(page, condition: str, timeout_s: float = WAIT_MS / 1000) -> None:
    """Wait until a JavaScript expression holds (polled: the page's CSP rules out
    `wait_for_function`, which evaluates strings)."""
    deadline = time.time() + timeout_s
    while not page.evaluate(condition):
        assert time.time() < deadline, f"not within {timeout_s} s: {condition}"
        page.wait_for_timeout(50)


def _wait_done(page, status: str = "succeeded") -> None:
    page.wait_for_selector(f"#progress-label[data-status={status}]")
    # A cancelled or failed label is set on the stream's last event, before the page resets its
    # buttons; the output stops being busy only after (CI once read a page mid-way).
    page.wait_for_selector('.output[aria-busy="false"]', state="attached")
    assert page.locator("#error").is_hidden(), page.inner_text("#error")


def test_the_page_loads_clean_and_shows_what_the_server_offers(open_page, app_url):
    page = open_page(app_url + "/")  # `/` redirects to the playground
    assert page.url == app_url + "/playground/"
    assert page.title() == "sdxl-serve playground"
    assert "sdxl-tiny on cpu" in page.inner_text("#server-status")
    # Other tests of the session may have registered LoRAs too (e.g. "pastel-trained"): this one by its value.
    assert page.locator("#lora-list li").filter(has=page.locator('input[value="pastel"]')).count() == 1
    assert page.locator("#controlnet option").all_inner_texts() == ["none", "canny", "silhouette"]
    assert page.is_visible("#refiner-section") and page.is_visible("#hires-section")
    assert page.input_value("#width") == "128" and page.input_value("#scheduler") == "euler"
    # Inpainting takes no refiner and no hires pass: their switches go away.
    page.check("input[name=mode][value=inpaint]")
    assert page.is_hidden("#refiner-section") and page.is_hidden("#hires-section") and page.is_visible("#init-image")
    # Keyboard: labelled fields in reading order, real buttons.
    page.focus("#prompt")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "negative-prompt"
    assert page.locator("#generate").evaluate("node => node.tagName") == "BUTTON"
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll("input, select, textarea")]
            .filter(node => !node.labels.length && !node.getAttribute("aria-label")).map(node => node.id)"""
    )
    assert unlabelled == []


def test_the_controls_bounds_and_tooltips_come_from_config(open_page, app_url):
    """Every numeric control's min, max, integer step, default and tooltip are what config.json
    serves (its `fields`, the request schema's, and its `limits`): index.html states none."""
    config = httpx.get(f"{app_url}/playground/config.json", timeout=30).json()
    fields, limits = config["fields"], config["limits"]
    page = open_page(app_url + "/playground/")
    page.click("#advanced summary")

    def control(id_: str) -> dict:
        return page.locator(f"#{id_}").evaluate(
            "node => ({min: node.min, max: node.max, step: node.step, value: node.value, title: node.title})"
        )

    # Bounds: (min, max) as numbers; an exclusive bound is the control's nearest step inside it.
    expected = {
        "guidance": (fields["guidance_scale"]["minimum"], fields["guidance_scale"]["maximum"]),
        "steps": (fields["num_inference_steps"]["minimum"], limits["max_steps"]),
        "width": (limits["min_side"], limits["max_side"]),
        "n": (fields["n"]["minimum"], limits["max_n"]),
        "seed": (fields["seed"]["minimum"], fields["seed"]["maximum"]),
        "strength": (fields["strength"]["exclusiveMinimum"] + 0.01, fields["strength"]["maximum"]),
        "mask-blur": (fields["mask_blur"]["minimum"], fields["mask_blur"]["maximum"]),
        "control-scale": (0, fields["controlnet.conditioning_scale"]["maximum"]),
        "control-end": (0, fields["controlnet.guidance_end"]["maximum"]),
        "refiner-switch": (fields["refiner.switch_at"]["exclusiveMinimum"] + 0.05, fields["refiner.switch_at"]["exclusiveMaximum"] - 0.05),
        "hires-scale": (fields["hires.scale"]["exclusiveMinimum"] + 0.25, fields["hires.scale"]["maximum"]),
        "guidance-end": (config["advanced"]["guidance_end"]["exclusiveMinimum"] + 0.05, 1),
        "deep-cache": (1, 10),
    }
    for id_, (low, high) in expected.items():
        seen = control(id_)
        assert (float(seen["min"]), float(seen["max"])) == pytest.approx((low, high)), id_
    assert (float(control("guidance")["max"]), float(control("hires-scale")["min"])) == (50, 1.25)
    # Integer fields step as their schema does; schema defaults fill the controls that send them.
    assert [control(id_)["step"] for id_ in ("width", "steps", "n", "seed", "mask-blur")] == ["8", "1", "1", "1", "1"]
    assert (control("n")["value"], control("mask-blur")["value"]) == ("1", "0")
    assert [control(id_)["value"] for id_ in ("control-scale", "control-start", "control-end")] == ["1", "0", "1"]
    # Tooltips: the schema's descriptions; the ControlNet's end is told apart from guidance's end.
    assert control("guidance")["title"] == fields["guidance_scale"]["description"]
    assert control("hires-strength")["title"] == fields["hires.strength"]["description"]
    assert control("control-end")["title"] == fields["controlnet.guidance_end"]["description"]
    assert control("guidance-end")["title"] == config["advanced"]["guidance_end"]["description"]
    assert control("deep-cache")["title"] == config["advanced"]["deep_cache_interval"]["description"]
    assert page.inner_text("label[for=control-end]") == "Control end"
    assert page.inner_text("label[for=guidance-end]") == "Guidance end"
    # Exact: an earlier test in the session may have trained "pastel-trained" (its label holds this one's).
    weight = page.get_by_label("Weight of pastel", exact=True)
    assert [float(weight.get_attribute(name)) for name in ("min", "max", "value")] == [-4, 4, 1]
    assert weight.get_attribute("title") == fields["loras.weight"]["description"]
    assert "weights −4 to 4" in page.inner_text("#lora-hint")
    # index.html itself bounds none of them: the page does not follow the schema by accident.
    html = httpx.get(f"{app_url}/playground/index.html", timeout=30).text
    assert 'max="50"' not in html and 'max="4"' not in html and 'min="1.25"' not in html


def test_phone_width_fits_without_sideways_scrolling(open_page, app_url):
    page = open_page(app_url + "/playground/", width=390, height=844)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    assert page.locator("#generate").bounding_box()["width"] > 40


def test_txt2img_shows_progress_then_the_image_and_its_seed(open_page, app_url, tmp_path):
    page = open_page(app_url + "/playground/")
    bodies = _job_bodies(page)
    page.fill("#prompt", "a large red star on a blue background, top left")
    _settings(page, steps=40, seed=1234)
    _record_progress(page)
    page.focus("#prompt")
    page.keyboard.press("Control+Enter")  # generates from the keyboard
    _wait_done(page)
    seen = page.evaluate("window.progressSeen")
    assert any(0 < value < 100 for value in seen), seen  # it moved on the way
    assert seen == sorted(seen) and seen[-1] == 100, seen  # never backwards, ends full
    card = page.locator("#gallery li").first
    assert card.get_attribute("data-seed") == "1234" and "Seed 1234" in card.inner_text()
    assert card.locator("img").evaluate("img => img.complete && img.naturalWidth") == 128
    (body,) = bodies
    assert body["kind"] == "txt2img" and body["params"]["seed"] == 1234 and "loras" not in body["params"]
    assert not {"timestep_spacing", "guidance_end"} & set(body["params"])  # empty: the server's defaults
    # One click reuses the seed; the download is the image.
    page.fill("#seed", "")
    card.locator("button.reuse-seed").click()
    assert page.input_value("#seed") == "1234"
    with page.expect_download() as download:
        card.locator("a.download").click()
    assert download.value.suggested_filename == "sdxl-1234.png"
    saved = tmp_path / "image.png"
    download.value.save_as(saved)
    assert Image.open(saved).size == (128, 128)


def test_done_is_said_only_once_the_image_is_shown(open_page, app_url):
    """The result is fetched after the job stream's last event: with that fetch held back, the
    label says it is fetching, not done, and the gallery is still empty."""
    page = open_page(app_url + "/playground/")
    held = []

    def hold(route):
        held.append(route)  # answered below, once the page has been seen waiting

    page.route("**/v1/jobs/*/result", hold)
    page.fill("#prompt", "a red circle on a blue background")
    _settings(page, steps=2, seed=5)
    page.click("#generate")
    page.wait_for_selector("#progress-label[data-status=fetching]")
    deadline = time.time() + WAIT_MS / 1000
    while not held:  # route handlers run while the page is waited on
        assert time.time() < deadline, "the page never asked for the result"
        page.wait_for_timeout(50)
    assert page.inner_text("#progress-label") == "Fetching the result…"
    assert page.get_attribute(".output", "aria-busy") == "true"
    assert page.locator("#gallery li").count() == 0
    held[0].continue_()
    _wait_done(page)
    assert page.inner_text("#progress-label").startswith("Done")
    assert page.locator("#gallery li").count() == 1


def test_inpainting_with_a_mask_painted_on_the_canvas(open_page, app_url):
    page = open_page(app_url + "/playground/")
    bodies = _job_bodies(page)
    page.check("input[name=mode][value=inpaint]")
    picture = Image.new("RGB", (64, 64), (40, 70, 210))
    page.set_input_files("#init-image", {"name": "blue.png", "mimeType": "image/png", "buffer": _png(picture)})
    page.wait_for_selector("#canvas-stack:not([hidden])")
    assert page.input_value("#width") == "64" and page.input_value("#height") == "64"
    page.fill("#prompt", "a large red circle on a blue background")
    _settings(page, steps=4, seed=7)
    # Paint a stroke across the left half of the image with the mouse.
    box = page.locator("#mask-canvas").bounding_box()
    page.fill("#brush-size", "48")  # display pixels: a sixth of the 64-pixel image
    page.mouse.move(box["x"] + box["width"] * 0.15, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    for step in range(1, 11):
        page.mouse.move(box["x"] + box["width"] * (0.15 + 0.02 * step), box["y"] + box["height"] * 0.5, steps=2)
    page.mouse.up()
    page.click("#generate")
    _wait_done(page)
    (body,) = bodies
    params = body["params"]
    assert body["kind"] == "inpaint" and params["width"] == 64 and params["strength"] == 1
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(params["mask"].split(",", 1)[1]))).convert("L"))
    assert mask.shape == (64, 64) and set(np.unique(mask)) == {0, 255}
    assert mask[32, 10:22].min() == 255  # under the stroke (x from 15% to 35%): repaint
    assert mask[:, 48:].max() == 0 and mask[:8].max() == 0  # elsewhere: keep
    card = page.locator("#gallery li").first
    assert card.get_attribute("data-seed") == "7"
    assert card.locator("img").evaluate("img => img.naturalWidth") == 64


def test_a_lora_picked_from_the_list_changes_the_request(open_page, app_url):
    page = open_page(app_url + "/playground/")
    bodies = _job_bodies(page)
    page.fill("#prompt", "a red circle")
    _settings(page, steps=3, width=64, height=64, seed=3)
    page.click("#generate")
    _wait_done(page)
    item = page.locator("#lora-list li").filter(has=page.locator('input[value="pastel"]'))
    item.locator("input[type=checkbox]").check()
    item.get_by_label("Weight of pastel").fill("0.8")
    page.click("#generate")
    _wait_done(page)
    assert page.locator("#gallery li").count() == 2
    without, with_lora = bodies
    assert "loras" not in without["params"]
    assert with_lora["params"]["loras"] == [{"name": "pastel", "weight": 0.8}]
    assert {key: value for key, value in with_lora["params"].items() if key != "loras"} == without["params"]


def test_advanced_settings_are_sent_and_the_servers_refusals_shown(open_page, app_url):
    """Timestep spacing, guidance end and the deep cache interval, offered from the schema
    config.json serves, go with the request when set; the combinations the server refuses come back as its 400, shown, naming the field."""
    page = open_page(app_url + "/playground/", refused=(400,))
    bodies = _job_bodies(page)
    page.fill("#prompt", "a green triangle")
    _settings(page, steps=6, width=64, height=64, seed=5, guidance=5)
    assert page.is_hidden("#timestep-spacing")  # folded away until asked for
    page.click("#advanced summary")
    assert page.locator("#timestep-spacing option").all_inner_texts() == ["default", "leading", "trailing", "linspace"]
    assert page.get_attribute("#guidance-end", "placeholder") == "1"
    assert page.get_attribute("#guidance-end", "max") == "1"
    assert page.get_attribute("#deep-cache", "placeholder") == "1"  # the deployment's default interval
    page.select_option("#timestep-spacing", "trailing")
    page.fill("#guidance-end", "0.5")
    page.fill("#deep-cache", "2")
    page.click("#generate")
    _wait_done(page)
    assert page.locator("#gallery li").count() == 1
    params = bodies[-1]["params"]
    assert (params["scheduler"], params["timestep_spacing"], params["guidance_end"]) == ("euler", "trailing", 0.5)
    assert params["deep_cache_interval"] == 2
    # LCM takes no spacing: the server's 400 is shown and no job runs.
    page.select_option("#scheduler", "lcm")
    page.click("#generate")
    page.locator("#error", has_text="timestep_spacing 'trailing' does not apply to scheduler 'lcm'").wait_for()
    assert page.get_attribute("#progress-label", "data-status") == "failed"
    # Guidance end without guidance: the same, naming guidance_end.
    page.select_option("#scheduler", "euler")
    page.fill("#guidance", "1")
    page.click("#generate")
    page.locator("#error", has_text="guidance_end 0.5 needs classifier-free guidance").wait_for()
    assert page.get_attribute("#progress-label", "data-status") == "failed"
    assert len(bodies) == 3 and page.locator("#gallery li").count() == 1


def test_cancel_stops_a_running_job(open_page, app_url):
    page = open_page(app_url + "/playground/")
    bodies_seen: list = []
    page.on("response", lambda response: response.url.endswith("/v1/jobs") and bodies_seen.append(response.json()))
    page.fill("#prompt", "a blue square")
    _settings(page, steps=150)  # the most this server takes: long enough to stop half-way
    page.click("#generate")
    _until(page, "document.getElementById('progress').value > 0")
    assert page.is_enabled("#cancel")
    page.click("#cancel")
    _wait_done(page, "cancelled")
    assert page.inner_text("#progress-label") == "Cancelled"
    assert page.is_enabled("#generate") and page.is_disabled("#cancel")
    assert page.locator("#gallery li").count() == 0
    (submitted,) = bodies_seen
    job = httpx.get(f"{app_url}/v1/jobs/{submitted['id']}", timeout=30).json()
    assert job["status"] == "cancelled" and job["progress"]["percent"] < 100


def test_batch_of_prompts_as_a_zip(open_page, app_url, tmp_path):
    page = open_page(app_url + "/playground/")
    _settings(page, steps=3, width=64, height=64, seed=11)
    page.fill("#batch-prompts", "a red circle\n\na green triangle\n")
    page.click("#run-batch")
    _wait_done(page)
    link = page.locator("#batch-download")
    assert link.is_visible() and link.inner_text() == "Download ZIP (2 images)"
    with page.expect_download() as download:
        link.click()
    saved = tmp_path / "batch.zip"
    download.value.save_as(saved)
    with zipfile.ZipFile(saved) as archive:
        manifest = json.loads(archive.read("manifest.json"))
    assert [entry["prompt"] for entry in manifest["images"]] == ["a red circle", "a green triangle"]
    prompts = page.locator("#gallery li .prompt").all_inner_texts()
    assert prompts == ["a red circle", "a green triangle"]


def test_an_api_key_stays_in_the_tab_and_goes_with_every_call(open_page, auth_url):
    page = open_page(auth_url + "/")  # -> /ui/play/
    assert page.url == auth_url + "/ui/play/"
    assert page.inner_text("#key-hint") == "This server needs an API key."
    assert page.is_hidden("#lora-section")
    sent: list = []
    page.on("request", lambda request: "/v1/" in request.url and sent.append(request.headers.get("authorization")))
    page.fill("#api-key", KEY)
    page.press("#api-key", "Tab")  # `change`: kept and used
    page.wait_for_selector("#lora-section:not([hidden])")
    # What this server does not offer is not shown.
    assert page.is_hidden("#controlnet-section") and page.is_hidden("#refiner-section")
    assert page.is_visible("#hires-section")
    assert page.evaluate("sessionStorage.getItem('sdxl-serve.api-key')") == KEY
    assert page.evaluate("localStorage.length") == 0
    page.fill("#prompt", "a red circle")
    _settings(page, steps=3, width=64, height=64)
    page.click("#generate")
    _wait_done(page)
    assert page.locator("#gallery li").count() == 1
    assert len(sent) >= 5 and set(sent) == {f"Bearer {KEY}"}  # lists, job, events, result
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.input_value("#api-key") == KEY and page.is_visible("#lora-section")
    page.click("#forget-key")
    assert page.evaluate("sessionStorage.length") == 0


def test_the_finished_page_with_a_controlnet_map(open_page, app_url):
    """A ControlNet map is made by the server and shown; four images come back. The screenshot of
    the finished page is the test's artifact (and the README's with UPDATE_SCREENSHOT=1)."""
    page = open_page(app_url + "/playground/", width=1280, height=1000)
    bodies = _job_bodies(page)
    page.fill("#prompt", "a large yellow star on a purple background")
    _settings(page, steps=20, n=4, seed=21)
    page.select_option("#controlnet", "canny")
    page.set_input_files("#control-image", {"name": "star.png", "mimeType": "image/png", "buffer": _star_picture()})
    _until(page, "document.getElementById('control-map').src.startsWith('blob:')")
    assert page.inner_text("#control-map-caption") == "The canny map it will follow"
    assert page.locator("#control-map").evaluate("img => img.complete && img.naturalWidth") == 128
    page.click("#generate")
    _wait_done(page)
    (body,) = bodies
    assert body["n"] == 4 and body["params"]["controlnet"]["name"] == "canny"
    assert body["params"]["controlnet"]["preprocess"] == "canny"
    seeds = [card.get_attribute("data-seed") for card in page.locator("#gallery li").all()]
    assert seeds == ["21", "22", "23", "24"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
    if os.environ.get("UPDATE_SCREENSHOT") == "1":  # the README's: the top of the page
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(ROOT / "docs" / "playground.png"))
    assert (ARTIFACTS / "playground.png").stat().st_size > 10_000


def test_nothing_is_left_running(browser, app_url):
    # After the browser tests (the `browser` fixture skips it with them where no chromium is).
    jobs = httpx.get(f"{app_url}/v1/jobs", params={"limit": 100}, timeout=30).json()["data"]
    assert jobs and not [job for job in jobs if job["status"] not in ("succeeded", "cancelled")]

