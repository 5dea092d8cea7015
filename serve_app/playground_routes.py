"""The browser playground: static files shipped in the package (`serve_app/playground/`), served
by the ingress at `ingress.playground` (default `/playground`; `GET /` redirects there).

The page is plain HTML, CSS and JavaScript (no build step, nothing from a CDN): every byte it
loads comes from here, and its Content-Security-Policy says so. It holds no data, so its routes
stay open with auth on; the API calls it makes carry the key typed into it (kept in the browser's
`sessionStorage`). None of these routes is in the OpenAPI schema. `config.json` tells the page the
deployment's defaults and limits (what `/openapi.json` states too) and the request schema of its
advanced fields and numeric controls (bounds, steps, defaults, descriptions: the page copies none);
which optional parts to show (LoRAs, ControlNets, the refiner) it asks the API itself.
"""

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, RedirectResponse, Response

from configs.app_args import AppArgs
from configs.schedulers import SCHEDULERS
from serve_app.openapi import body_schema, side_bounds
from serve_app.protocol import Img2ImgRequest, InpaintRequest, Txt2ImgJob, Txt2ImgRequest

#: Request fields the page offers as advanced settings, empty unless set: their allowed values,
#: bounds, default and description come from the request schema (their one definition), so the
#: page follows it rather than copying it.
ADVANCED_FIELDS = ("timestep_spacing", "guidance_end", "deep_cache_interval")
#: The request fields the page's other numeric controls set (`a.b`: field `b` of the object `a`, or
#: of each item of the list `a`), with the request whose schema states each: the page takes their
#: bounds, integer steps, defaults and descriptions (its tooltips) from config.json's `fields`. Where
#: the deployment bounds a field further (steps, the sides, `n`), the page takes that from `limits`,
#: as `/openapi.json` writes those limits over the same fields.
FIELDS: dict[str, type] = {
    "width": Img2ImgRequest,
    "height": Img2ImgRequest,
    "num_inference_steps": Img2ImgRequest,
    "guidance_scale": Img2ImgRequest,
    "seed": Img2ImgRequest,
    "n": Txt2ImgJob,
    "strength": Img2ImgRequest,
    "mask_blur": InpaintRequest,
    "loras.weight": Img2ImgRequest,
    "controlnet.conditioning_scale": Img2ImgRequest,
    "controlnet.guidance_start": Img2ImgRequest,
    "controlnet.guidance_end": Img2ImgRequest,
    "refiner.switch_at": Img2ImgRequest,
    "refiner.strength": Img2ImgRequest,
    "hires.scale": Txt2ImgRequest,
    "hires.strength": Txt2ImgRequest,
}
#: The page's files, in the package (`[tool.setuptools.package-data]`).
STATIC_DIR = Path(__file__).resolve().parent / "playground"
_MEDIA_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
#: Everything the page loads is this origin's; images it shows are blobs and data: URLs it made.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def page_config(args: AppArgs) -> dict[str, Any]:
    """What the page's form starts from: the served model's defaults and this deployment's limits."""
    limits, model = args.limits, args.model
    smallest, largest = side_bounds(limits)
    return {
        "path": args.ingress.playground,
        "auth": args.auth.enabled,
        "model": model.name,
        "defaults": {
            "width": model.default_size[0],
            "height": model.default_size[1],
            "steps": model.default_steps,
            "guidance_scale": model.default_guidance_scale,
            "scheduler": model.default_scheduler,
            "deep_cache_interval": model.default_deep_cache_interval,
        },
        "limits": {
            "min_side": smallest,
            "max_side": largest,
            "max_pixels": limits.max_pixels,
            "max_steps": limits.max_steps,
            "max_n": limits.max_n,
            "max_prompt_chars": limits.max_prompt_chars,
            "max_loras": limits.max_loras,
            "max_upload_bytes": limits.max_upload_bytes,
            "max_batch_items": args.jobs.max_batch_items,
        },
        "schedulers": SCHEDULERS,
        "advanced": advanced_fields(),
        "fields": field_schemas(),
    }


def advanced_fields() -> dict[str, dict[str, Any]]:
    """The schema of each of `ADVANCED_FIELDS` as `/openapi.json` states it for `/v1/img2img`'s
    multipart form (every generation kind shares these fields): there an optional field is absent
    rather than null, as the page leaves an empty control out of its request."""
    form = _form(Img2ImgRequest)
    return {name: form["properties"][name] for name in ADVANCED_FIELDS}


def field_schemas() -> dict[str, dict[str, Any]]:
    """The schema of each of `FIELDS` in its request's multipart form, as `advanced_fields`'s (an
    optional field absent rather than null; a request served as JSON only, or a job's `n`, states
    the same bounds there), without the deployment's limits (`page_config`'s `limits`)."""
    forms = {model: _form(model) for model in set(FIELDS.values())}
    schemas = {}
    for path, model in FIELDS.items():
        node = forms[model]
        for name in path.split("."):
            node = node.get("items", node)["properties"][name]
        schemas[path] = node
    return schemas


def _form(model: type) -> dict[str, Any]:
    return body_schema(model)["requestBody"]["content"]["multipart/form-data"]["schema"]


def install_playground(app: FastAPI, args: AppArgs) -> None:
    """Serve the playground at `args.ingress.playground` (nothing when it is off)."""
    path = args.ingress.playground
    if not path:
        return
    files = {name: (STATIC_DIR / name).read_bytes() for name in _MEDIA_TYPES}
    config = page_config(args)
    # Relative redirects: behind a proxy that adds a path prefix they stay under it.
    leaf = path.rsplit("/", 1)[1] + "/"

    def static(name: str) -> Response:
        return Response(files[name], media_type=_MEDIA_TYPES[name], headers=_HEADERS)

    @app.get("/", include_in_schema=False)
    async def root() -> Response:
        return RedirectResponse(path.lstrip("/") + "/", status_code=307)

    @app.get(path, include_in_schema=False)
    async def playground_without_slash() -> Response:
        return RedirectResponse(leaf, status_code=307)

    @app.get(path + "/", include_in_schema=False)
    async def playground_index() -> Response:
        return static("index.html")

    @app.get(path + "/config.json", include_in_schema=False)
    async def playground_config() -> Response:
        return JSONResponse(config, headers=_HEADERS)

    for name in _MEDIA_TYPES:
        app.add_api_route(f"{path}/{name}", _static_route(static, name), methods=["GET"], include_in_schema=False)


def _static_route(static: Any, name: str) -> Any:
    async def route() -> Response:
        return static(name)

    route.__name__ = "playground_" + name.replace(".", "_")
    return route
