"""Serving logic of async jobs and batches: validate the nested requests, hand jobs to the job
manager, build batch ZIPs. No HTTP and no torch here."""

import asyncio
from typing import Any, Optional

from pydantic import ValidationError

from configs.app_args import AppArgs
from deployments.types import GenerationRequest, InvalidRequestError
from serve_app.errors import invalid_request_from, renamed_params
from serve_app.jobs.archive import build_result
from serve_app.jobs.manager import JobPayload
from serve_app.protocol import BatchRequest, Img2ImgRequest, InpaintRequest, JobSubmission, Txt2ImgRequest
from serve_app.serving_images import ImageServing

_PARAMS = {"txt2img": Txt2ImgRequest, "img2img": Img2ImgRequest, "inpaint": InpaintRequest}
#: Fields of the native bodies that make no sense once results are stored.
_NOT_FOR_JOBS = ("response_format",)


def links(job_id: str) -> dict[str, str]:
    base = f"/v1/jobs/{job_id}"
    return {"self": base, "result": f"{base}/result", "events": f"{base}/events", "cancel": base}


class JobServing:
    def __init__(self, images: ImageServing, manager: Any, args: AppArgs):
        self._images = images
        self._manager = manager
        self._args = args

    async def submit(self, body: JobSubmission) -> dict[str, Any]:
        self._images.check_n(body.n)
        # Decoding uploaded images is CPU work: keep it off the event loop.
        requests, params = await asyncio.to_thread(self._requests, body.kind, body.params, body.n, "params")
        payload = JobPayload(requests, params.output_format, params.output_compression)
        view = await self._manager.submit.remote(payload, body.kind, _url(body.webhook_url))
        return {**view, "links": links(view["id"])}

    def batch_payload(self, body: BatchRequest) -> JobPayload:
        items = self._batch_items(body)
        if len(items) > self._args.jobs.max_batch_items:
            raise InvalidRequestError(
                f"the batch has {len(items)} requests; the limit is {self._args.jobs.max_batch_items}",
                param="requests" if body.requests else "prompts",
                code="batch_too_large",
            )
        if body.webhook_url is not None and not body.run_async:
            raise InvalidRequestError("webhook_url needs async: true", param="webhook_url")
        requests: list[GenerationRequest] = []
        for kind, params, where in items:
            for name in ("output_format", "output_compression"):
                if name in params:
                    raise InvalidRequestError(
                        f"{where}.{name}: set {name} once, at the top level of the batch", param=f"{where}.{name}"
                    )
            requests.extend(self._requests(kind, params, 1, where)[0])
        return JobPayload(requests, body.output_format, body.output_compression, archive=True)

    async def run_batch(self, payload: JobPayload) -> tuple[bytes, str, str]:
        results = await self._images.generate(payload.requests)
        return await asyncio.to_thread(
            build_result, payload.requests, results, payload.output_format, payload.output_compression, True
        )

    async def submit_batch(self, payload: JobPayload, webhook_url: Optional[Any]) -> dict[str, Any]:
        view = await self._manager.submit.remote(payload, "batch", _url(webhook_url))
        return {**view, "links": links(view["id"])}

    @staticmethod
    def _batch_items(body: BatchRequest) -> list[tuple[str, dict, str]]:
        if (body.prompts is None) == (body.requests is None):
            raise InvalidRequestError("give either prompts or requests", param="prompts", code="invalid_batch")
        if body.prompts is not None:
            shared = body.params or {}
            if "prompt" in shared:
                raise InvalidRequestError("params.prompt: the prompts come from `prompts`", param="params.prompt")
            return [("txt2img", {**shared, "prompt": p}, f"prompts.{i}") for i, p in enumerate(body.prompts)]
        if body.params is not None:
            raise InvalidRequestError("params goes with prompts; each request has its own", param="params")
        return [(item.kind, item.params, f"requests.{i}.params") for i, item in enumerate(body.requests)]

    def _requests(self, kind: str, params: dict, n: int, where: str) -> tuple[list[GenerationRequest], Any]:
        """Validate a nested native body; errors name the field under `where` (e.g. params.width)."""
        with renamed_params(lambda param: where if param is None else f"{where}.{param}"):
            for name in _NOT_FOR_JOBS:
                if name in params:
                    raise InvalidRequestError(f"{name} does not apply here; fetch the stored result", param=name)
            try:
                body = _PARAMS[kind].model_validate(params)
            except ValidationError as exc:
                raise invalid_request_from(exc.errors()) from None
            make = {"txt2img": self._images.requests_for_txt2img, "img2img": self._images.requests_for_img2img,
                    "inpaint": self._images.requests_for_inpaint}[kind]
            # Stored work waits in a queue: the deadline is set per attempt by the job manager.
            requests = [r.model_copy(update={"deadline": None}) for r in make(body, n)]
        return requests, body


def _url(value: Optional[Any]) -> Optional[str]:
    return None if value is None else str(value)
