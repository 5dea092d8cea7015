"""Serving logic of async jobs and batches: turn the (already schema-checked) nested requests into
engine requests, hand jobs to the job manager, build batch ZIPs. No HTTP and no torch here."""

import asyncio
from typing import Any, Optional

from configs.app_args import AppArgs
from deployments.types import GenerationRequest, InvalidRequestError
from serve_app.auth import ANONYMOUS, Principal
from serve_app.errors import renamed_params
from serve_app.jobs import webhooks
from serve_app.jobs.archive import build_result
from serve_app.jobs.payload import JobPayload
from serve_app.protocol import BatchRequest, JobSubmission, Txt2ImgItemParams
from serve_app.serving_images import ImageServing


def links(job_id: str) -> dict[str, str]:
    base = f"/v1/jobs/{job_id}"
    return {"self": base, "result": f"{base}/result", "events": f"{base}/events", "cancel": base}


class JobServing:
    def __init__(self, images: ImageServing, manager: Any, args: AppArgs):
        self._images = images
        self._manager = manager
        self._args = args

    async def submit(self, body: JobSubmission, principal: Principal = ANONYMOUS) -> dict[str, Any]:
        """Queue a job as `principal`'s (its tenant owns it; its `concurrent_jobs` quota holds)."""
        self._images.check_n(body.n)
        webhook_url = _url(body.webhook_url, self._args.jobs.webhook_allow)
        # Decoding uploaded images is CPU work: keep it off the event loop.
        requests = await asyncio.to_thread(self._requests, body.kind, body.params, body.n, "params", principal.owner)
        payload = JobPayload(requests, body.params.output_format, body.params.output_compression)
        view = await self._manager.submit.remote(payload, body.kind, webhook_url, *job_owner(principal))
        return {**view, "links": links(view["id"])}

    def batch_payload(self, body: BatchRequest, owner: Optional[str] = None) -> JobPayload:
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
            requests.extend(self._requests(kind, params, 1, where, owner))
        return JobPayload(requests, body.output_format, body.output_compression, archive=True)

    async def run_batch(self, payload: JobPayload) -> tuple[bytes, str, str]:
        generated = await self._images.generate(payload.requests)
        return await asyncio.to_thread(
            build_result, payload.requests, generated.results, payload.output_format, payload.output_compression, True
        )

    async def submit_batch(self, payload: JobPayload, webhook_url: Optional[Any], principal: Principal = ANONYMOUS) -> dict[str, Any]:
        webhook_url = _url(webhook_url, self._args.jobs.webhook_allow)
        view = await self._manager.submit.remote(payload, "batch", webhook_url, *job_owner(principal))
        return {**view, "links": links(view["id"])}

    @staticmethod
    def _batch_items(body: BatchRequest) -> list[tuple[str, Any, str]]:
        # The schema states these rules too (oneOf); a body that breaks them is answered here,
        # naming the field.
        if (body.prompts is None) == (body.requests is None):
            raise InvalidRequestError("give either prompts or requests", param="prompts", code="invalid_batch")
        if body.prompts is not None:
            shared = body.params.model_dump(exclude_unset=True) if body.params is not None else {}
            return [
                ("txt2img", Txt2ImgItemParams.model_validate({**shared, "prompt": prompt}), f"prompts.{i}")
                for i, prompt in enumerate(body.prompts)
            ]
        if body.params is not None:
            raise InvalidRequestError("params goes with prompts; each request has its own", param="params")
        return [(item.kind, item.params, f"requests.{i}.params") for i, item in enumerate(body.requests)]

    def _requests(self, kind: str, params: Any, n: int, where: str, owner: Optional[str] = None) -> list[GenerationRequest]:
        """Engine requests for a nested native body; errors name the field under `where`
        (e.g. params.width)."""
        with renamed_params(lambda param: where if param is None else f"{where}.{param}"):
            make = {
                "txt2img": self._images.requests_for_txt2img,
                "img2img": self._images.requests_for_img2img,
                "inpaint": self._images.requests_for_inpaint,
            }[kind]
            # Stored work waits in a queue: the deadline is set per attempt by the job manager.
            return [r.model_copy(update={"deadline": None}) for r in make(params, n, owner=owner)]


def job_owner(principal: Principal) -> tuple[Optional[str], Optional[int]]:
    """The `owner` and `concurrent_jobs` arguments of `JobManager.submit` for a principal."""
    return principal.owner, None if principal.key is None else principal.key.concurrent_jobs


def _url(value: Optional[Any], allow: list[str]) -> Optional[str]:
    """The webhook URL as a string; a 400 naming `webhook_url` for an internal literal host."""
    return None if value is None else webhooks.check_submitted(str(value), allow)
