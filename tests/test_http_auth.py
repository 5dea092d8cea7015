"""API keys, tenants and quotas over HTTP, in process against fake engines and a real job manager:
401 without a known key, 403 without the scope, 404 for another tenant's jobs and LoRAs, 429 with
`Retry-After` past a quota, the open paths, the schema's security scheme."""

import asyncio
import hashlib
import json
import logging
import time

import pytest

from configs.app_args import AppArgs, AuthConfig
from configs.model_spec import TINY_LORA_DIR
from deployments.lora_registry import describe
from serve_app.auth import ApiKeys
from serve_app.quotas import RateLimiter
from tests.fakes import FakeEngine, local_app

pytestmark = pytest.mark.anyio

KEYS = {"alice": "sk-alice-0123456789", "bob": "sk-bob-0123456789", "ops": "sk-ops-0123456789", "painter": "sk-painter-0123"}


@pytest.fixture
def anyio_backend():
    return "asyncio"


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _auth(**alice) -> dict:
    return {
        "enabled": True,
        "keys": [
            {"name": "alice", "key_sha256": _sha(KEYS["alice"]), **alice},
            {"name": "bob", "key_sha256": _sha(KEYS["bob"])},
            {"name": "ops", "key_sha256": _sha(KEYS["ops"]), "scopes": ["admin"]},
            {"name": "painter", "key_sha256": _sha(KEYS["painter"]), "scopes": ["generate"]},
        ],
    }


def _as(name: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[name]}"}


class _ListingEngine(FakeEngine):
    """Lists what the registry folder holds (the fake engine lists nothing otherwise)."""

    def __init__(self, folder):
        super().__init__()
        self.folder = folder

    async def describe_loras(self):
        paths = sorted([*self.folder.glob("*.safetensors"), *TINY_LORA_DIR.glob("*.safetensors")])
        return [{**describe(path, path.stem, builtin=path.parent == TINY_LORA_DIR).to_json(), "fits": True, "error": None} for path in paths]


TXT2IMG = {"prompt": "a red circle", "width": 64, "height": 64, "num_inference_steps": 2}


async def test_without_a_known_key_every_endpoint_but_the_open_ones_is_401(tmp_path):
    async with local_app(FakeEngine(), tmp_path, auth=_auth()) as client:
        missing = await client.post("/v1/txt2img", json=TXT2IMG)
        wrong = await client.get("/v1/jobs", headers={"Authorization": "Bearer sk-nobody"})
        basic = await client.get("/v1/models", headers={"Authorization": "Basic YWxpY2U6eA=="})
        assert [r.status_code for r in (missing, wrong, basic)] == [401, 401, 401]
        assert missing.headers["www-authenticate"] == "Bearer"
        assert missing.json()["error"]["type"] == "authentication_error" and missing.json()["error"]["code"] == "missing_api_key"
        assert wrong.json()["error"]["code"] == "invalid_api_key"
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/v1/files/file-unknown")).status_code == 404  # a capability URL: no key
        assert (await client.post("/v1/txt2img", json=TXT2IMG, headers=_as("alice"))).status_code == 200
        schema = (await client.get("/openapi.json")).json()
        assert schema["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
        assert schema["security"] == [{"apiKey": []}] and schema["paths"]["/healthz"]["get"]["security"] == []


async def test_a_key_without_the_scope_gets_403(tmp_path):
    async with local_app(FakeEngine(), tmp_path, auth=_auth()) as client:
        assert (await client.post("/v1/txt2img", json=TXT2IMG, headers=_as("painter"))).status_code == 200
        job = await client.post("/v1/jobs", json={"kind": "txt2img", "params": TXT2IMG}, headers=_as("painter"))
        batch = await client.post("/v1/images/batch", json={"prompts": ["a"], "async": True}, headers=_as("painter"))
        delete = await client.delete("/v1/loras/pastel", headers=_as("painter"))
        for response in (job, batch, delete):
            assert response.status_code == 403, response.text
            assert response.json()["error"]["type"] == "permission_error" and response.json()["error"]["code"] == "missing_scope"


async def test_jobs_belong_to_their_key_and_an_admin_sees_all(tmp_path):
    async with local_app(FakeEngine(), tmp_path, auth=_auth()) as client:
        view = (await client.post("/v1/jobs", json={"kind": "txt2img", "params": TXT2IMG}, headers=_as("alice"))).json()
        job = f"/v1/jobs/{view['id']}"
        for path in (job, f"{job}/result", f"{job}/events"):
            refused = await client.get(path, headers=_as("bob"))
            assert refused.status_code == 404 and refused.json()["error"]["code"] == "job_not_found", path
        assert (await client.delete(job, headers=_as("bob"))).status_code == 404
        assert (await client.get("/v1/jobs", headers=_as("bob"))).json()["data"] == []
        assert [j["id"] for j in (await client.get("/v1/jobs", headers=_as("alice"))).json()["data"]] == [view["id"]]
        assert (await client.get(job, headers=_as("ops"))).status_code == 200


async def test_uploaded_loras_belong_to_their_key(tmp_path):
    engine = _ListingEngine(tmp_path / "loras")
    async with local_app(engine, tmp_path, auth=_auth()) as client:
        data = (TINY_LORA_DIR / "pastel.safetensors").read_bytes()
        uploaded = await client.post("/v1/loras", data={"name": "alices"}, files={"file": ("a.safetensors", data)}, headers=_as("alice"))
        assert uploaded.status_code == 201, uploaded.text
        names = {key: {item["name"] for item in (await client.get("/v1/loras", headers=_as(key))).json()["data"]} for key in ("alice", "bob", "ops")}
        assert names == {"alice": {"alices", "pastel"}, "bob": {"pastel"}, "ops": {"alices", "pastel"}}
        body = {**TXT2IMG, "loras": [{"name": "alices"}]}
        used = await client.post("/v1/txt2img", json=body, headers=_as("bob"))
        assert used.status_code == 404 and used.json()["error"]["param"] == "loras.0.name"
        assert (await client.delete("/v1/loras/alices", headers=_as("bob"))).status_code == 404
        taken = await client.post("/v1/loras", data={"name": "alices"}, files={"file": ("a.safetensors", data)}, headers=_as("bob"))
        assert taken.status_code == 409  # names are one namespace
        assert (await client.post("/v1/txt2img", json=body, headers=_as("alice"))).status_code == 200
        assert (await client.delete("/v1/loras/alices", headers=_as("alice"))).status_code == 200
        assert not list((tmp_path / "loras").glob(".alices*"))


async def test_past_a_request_quota_the_answer_is_429_with_retry_after(tmp_path):
    async with local_app(FakeEngine(), tmp_path, auth=_auth(requests_per_minute=2)) as client:
        answers = [await client.get("/v1/models", headers=_as("alice")) for _ in range(3)]
        assert [r.status_code for r in answers] == [200, 200, 429]
        error = answers[2].json()["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "rate_limited"
        assert 1 <= int(answers[2].headers["retry-after"]) <= 30  # a token refills in 30 s at 2 a minute
        assert (await client.get("/v1/models", headers=_as("bob"))).status_code == 200  # per key


async def test_an_image_quota_counts_images_jobs_included(tmp_path):
    async with local_app(FakeEngine(), tmp_path, auth=_auth(images_per_minute=3)) as client:
        body = {"prompt": "x", "size": "64x64", "n": 2, "response_format": "b64_json"}
        assert (await client.post("/v1/images/generations", json=body, headers=_as("alice"))).status_code == 200
        refused = await client.post("/v1/jobs", json={"kind": "txt2img", "n": 2, "params": TXT2IMG}, headers=_as("alice"))
        assert refused.status_code == 429 and "images per minute" in refused.json()["error"]["message"]
        assert (await client.post("/v1/txt2img", json=TXT2IMG, headers=_as("alice"))).status_code == 200  # the third


async def test_a_concurrent_jobs_quota_holds_until_a_job_ends(tmp_path):
    async with local_app(FakeEngine(delay_s=30), tmp_path, auth=_auth(concurrent_jobs=1)) as client:
        submit = {"kind": "txt2img", "params": TXT2IMG}
        first = (await client.post("/v1/jobs", json=submit, headers=_as("alice"))).json()
        second = await client.post("/v1/jobs", json=submit, headers=_as("alice"))
        assert second.status_code == 429 and second.json()["error"]["code"] == "concurrent_jobs"
        assert "retry-after" in second.headers
        await client.delete(f"/v1/jobs/{first['id']}", headers=_as("alice"))
        assert (await client.post("/v1/jobs", json=submit, headers=_as("alice"))).status_code == 202


def test_keys_come_from_the_environment_or_a_hash_and_never_sit_in_the_config():
    config = AuthConfig.model_validate({"enabled": True, "keys": [{"name": "svc", "key_env": "SVC_KEY"}]})
    with pytest.raises(ValueError, match="SVC_KEY is not set"):
        ApiKeys(config, environ={})
    keys = ApiKeys(config, environ={"SVC_KEY": "sk-svc"})
    assert keys.check("Bearer sk-svc", "generate").name == "svc"
    with pytest.raises(ValueError, match="exactly one of key_env and key_sha256"):
        AuthConfig.model_validate({"keys": [{"name": "x"}]})
    with pytest.raises(ValueError, match="at least one key"):
        AppArgs.model_validate({"auth": {"enabled": True}})


def test_a_rate_limiter_refills_over_the_minute_and_takes_all_or_nothing():
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    limits = {"requests": 60, "images": 4}
    assert limiter.admit("k", limits, {"requests": 1, "images": 3}) == 0.0
    assert limiter.admit("k", limits, {"requests": 1, "images": 3}) == pytest.approx(30.0)  # 2 images short at 4/min
    now[0] = 30.0
    assert limiter.admit("k", limits, {"requests": 1, "images": 3}) == 0.0  # the refused call took nothing
    assert limiter.admit("k", limits, {"images": 5}) == 60.0  # more than a minute's worth: never
    assert asyncio.iscoroutinefunction(limiter.admit) is False


async def test_each_request_is_one_json_log_line_naming_the_key_never_the_key_or_the_prompt(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ray.serve.access")
    async with local_app(FakeEngine(), tmp_path, auth=_auth()) as client:
        answered = await client.post("/v1/txt2img", json={**TXT2IMG, "prompt": "secret plans"}, headers=_as("alice"))
        await client.get("/v1/jobs", headers={"Authorization": "Bearer sk-wrong"})
    lines = [json.loads(record.getMessage()) for record in caplog.records if record.name == "ray.serve.access"]
    generated, refused = lines
    assert generated["id"] == answered.headers["x-request-id"] and generated["key"] == "alice" and generated["status"] == 200
    assert (generated["kind"], generated["images"], generated["size"], generated["steps"]) == ("txt2img", 1, "64x64", 2)
    assert refused["status"] == 401 and "key" not in refused
    assert not any(secret in caplog.text for secret in ("secret plans", KEYS["alice"], "sk-wrong"))


async def test_prompts_are_logged_only_when_configured(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ray.serve.access")
    async with local_app(FakeEngine(), tmp_path, ingress={"log_prompts": True}) as client:
        await client.post("/v1/txt2img", json={**TXT2IMG, "prompt": "a blue square"})
    (line,) = [json.loads(record.getMessage()) for record in caplog.records if record.name == "ray.serve.access"]
    assert line["prompt"] == "a blue square" and line.get("key") is None


async def test_a_client_may_bring_its_deadline_forward(tmp_path):
    engine = FakeEngine(delay_s=5)
    async with local_app(engine, tmp_path) as client:
        started = time.monotonic()
        late = await client.post("/v1/txt2img", json=TXT2IMG, headers={"X-Request-Timeout": "0.3"})
        assert late.status_code == 504 and late.json()["error"]["code"] == "timeout"
        assert time.monotonic() - started < 3
        assert engine.requests[0].deadline <= time.time() + 0.3  # the engine drops the row at that time too
        bad = await client.post("/v1/txt2img", json=TXT2IMG, headers={"X-Request-Timeout": "forever"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Request-Timeout"


async def test_cors_is_off_unless_origins_are_configured(tmp_path):
    preflight = {"Origin": "https://studio.example.com", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    async with local_app(FakeEngine(), tmp_path) as client:
        closed = await client.options("/v1/txt2img", headers=preflight)
        plain = await client.get("/healthz", headers={"Origin": "https://studio.example.com"})
    assert "access-control-allow-origin" not in closed.headers and "access-control-allow-origin" not in plain.headers
    async with local_app(FakeEngine(), tmp_path, ingress={"cors_origins": ["https://studio.example.com"]}) as client:
        opened = await client.options("/v1/txt2img", headers=preflight)
        other = await client.options("/v1/txt2img", headers={**preflight, "Origin": "https://evil.example"})
    assert opened.status_code == 200 and opened.headers["access-control-allow-origin"] == "https://studio.example.com"
    assert "authorization" in opened.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-origin" not in other.headers
