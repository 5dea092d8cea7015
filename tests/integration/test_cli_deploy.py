"""Cluster operations as Ray users run them: `ray start --head`, `serve deploy`, `serve status`,
one request, `serve shutdown`, `ray stop`. Runs first (see tests/conftest.py): `ray stop` ends every
Ray process on the machine, and a second local cluster would collide with the in-process one."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.app_config import free_port

pytestmark = [pytest.mark.integration, pytest.mark.cli]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    tool = shutil.which(args[0], path=str(BIN)) or args[0]
    return subprocess.run(
        [tool, *args[1:]], capture_output=True, text=True, timeout=timeout, env=os.environ.copy(), cwd=REPO
    )


@pytest.fixture()
def head_node():
    dashboard = free_port()
    started = _cli(
        # --num-cpus is logical: what serve_config.yaml reserves.
        "ray", "start", "--head", "--num-cpus=5", f"--port={free_port()}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        "--disable-usage-stats",
    )
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        _cli("ray", "stop", "--force")


def test_serve_deploy_status_and_request(head_node, tmp_path):
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    http_port = free_port()
    config["http_options"]["port"] = http_port
    args = config["applications"][0]["args"]
    args["jobs"] = {"db_path": str(tmp_path / "jobs.sqlite3"), "results_dir": str(tmp_path / "results")}
    config_file = tmp_path / "serve_config.yaml"
    config_file.write_text(yaml.safe_dump(config))

    deployed = _cli("serve", "deploy", str(config_file), "-a", head_node)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    # Wait on the dashboard's endpoint that `serve status` reads (a `serve status` process per poll
    # costs a second of CPU the replicas starting beside it need), then ask the CLI once.
    for _ in range(120):
        answer = httpx.get(f"{head_node}/api/serve/applications/", timeout=30)
        details = answer.json() if answer.status_code == 200 else {}
        app = (details.get("applications") or {}).get("sdxl", {})
        if app.get("status") == "RUNNING":
            break
        assert app.get("status") != "DEPLOY_FAILED", details
        time.sleep(1)
    shown = _cli("serve", "status", "-a", head_node)
    status = yaml.safe_load(shown.stdout) or {}
    app = status["applications"]["sdxl"]
    assert app["status"] == "RUNNING"
    assert {name: d["status"] for name, d in app["deployments"].items()} == {
        "ImageIngress": "HEALTHY",
        "JobManager": "HEALTHY",
        "SDXLBase": "HEALTHY",
        "SDXLControlNet-canny": "HEALTHY",  # one deployment per ControlNet variant
        "SDXLControlNet-silhouette": "HEALTHY",
        "SDXLRefiner": "HEALTHY",
    }

    response = httpx.post(
        f"http://127.0.0.1:{http_port}/v1/txt2img",
        json={"prompt": "a red circle", "width": 64, "height": 64, "num_inference_steps": 2},
        timeout=60,
    )
    assert response.status_code == 200 and response.content.startswith(b"\x89PNG")

    shut = _cli("serve", "shutdown", "-y", "-a", head_node)
    assert shut.returncode == 0, shut.stdout + shut.stderr
