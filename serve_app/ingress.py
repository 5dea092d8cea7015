"""The HTTP ingress deployment: serves `create_app(...)` over the handles the builder binds.

Ray Serve calls `__serve_build_asgi_app__` after the constructor, so the app is built from this
replica's own handles and arguments (no module-level app); `serve_app/http_app.py` holds the
routes and is tested without Ray.
"""

from typing import Any

from fastapi import FastAPI
from ray import serve

from configs.app_args import AppArgs
from serve_app.http_app import create_app


@serve.deployment(name="ImageIngress")
@serve.ingress()
class ImageIngress:
    """The HTTP face: validation, routing to the engines, jobs, image encoding."""

    def __init__(self, engines: dict[str, Any], jobs: Any, args: dict[str, Any]):
        """`engines`: the engine handles by role (`{"base": handle}`), `jobs`: the job manager."""
        self._app = create_app(engines, jobs, AppArgs.model_validate(args))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._app
