"""The import rules of the architecture, checked in fresh interpreters: the ingress never loads
torch or diffusers; the engine and the models never load Ray or the HTTP side."""

import subprocess
import sys

import pytest


def _loaded(modules: list[str]) -> set[str]:
    code = (
        "import sys\n"
        + "".join(f"import {module}\n" for module in modules)
        + "print(' '.join(sorted({name.split('.')[0] for name in sys.modules})))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(done.stdout.split())


@pytest.mark.parametrize("modules", [["serve_app.ingress", "serve_app.builder", "serve_app.jobs.manager", "serve_app.serving_training"]])
def test_the_face_never_loads_torch(modules):
    loaded = _loaded(modules)
    assert not loaded & {"torch", "diffusers", "transformers"}, loaded & {"torch", "diffusers", "transformers"}


def test_the_engine_and_models_never_load_ray_or_http():
    loaded = _loaded([
        "deployments.engine.loop", "deployments.engine.factory", "deployments.pipelines",
        "deployments.engine.lora_trainer", "deployments.engine.training_queue",
    ])
    assert "torch" in loaded
    assert not loaded & {"ray", "serve_app", "fastapi", "starlette"}, loaded & {"ray", "serve_app", "fastapi", "starlette"}
