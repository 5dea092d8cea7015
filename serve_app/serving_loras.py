"""Serving logic of the LoRA registry: list, upload, delete. No HTTP and no torch here.

An upload is copied beside the registry's files under a hidden name, checked by an engine replica
(it reads the file and fits it to the served model), and only then published under its name; a
file that is not a LoRA for this model never becomes visible. The ingress and the engine replicas
read the same folder (`loras.dir`): one machine, or storage every node mounts.
"""

import asyncio
from pathlib import Path
from typing import Any, BinaryIO, Optional

from configs.app_args import LorasConfig
from deployments.lora_registry import PICKLE_SUFFIXES, SUFFIX, LoraRegistry, check_name, lora_registry
from deployments.types import InvalidRequestError, LoraRef


class LoraServing:
    def __init__(self, config: LorasConfig, engine: Any, call: Any):
        """`engine`: the base engine's handle (any replica can check a file); `call`: how the app
        awaits a handle call (mapping Ray's failures to the envelope)."""
        self.registry: LoraRegistry = lora_registry(config)
        self._config = config
        self._engine = engine
        self._call = call

    async def list(self, owner: Optional[str] = None) -> dict[str, Any]:
        """The LoRAs `owner` may use (None: all)."""
        described = await self._call(self._engine.describe_loras)
        return {"object": "list", "data": [item for item in described if self.registry.visible(item["name"], owner)]}

    async def upload(
        self, source: BinaryIO, file_name: Optional[str], name: Optional[str], owner: Optional[str] = None
    ) -> dict[str, Any]:
        """Check, then publish an uploaded LoRA file under `name` (default: the file's name), as
        `owner`'s (None: everyone's)."""
        if file_name and not file_name.lower().endswith(SUFFIX):
            if file_name.lower().endswith(PICKLE_SUFFIXES):
                check_name(file_name, "file")  # the pickle refusal
            raise InvalidRequestError(
                f"file {file_name!r} is not a .safetensors file; only safetensors LoRAs are read",
                param="file",
                code="unsupported_lora_format",
            )
        if name is None and not file_name:
            raise InvalidRequestError("give the LoRA a name (or upload a file with a name)", param="name", code="missing")
        name = check_name(name or Path(file_name).name, "name" if name else "file")
        staged = await asyncio.to_thread(self.registry.stage, source, self._config.max_upload_bytes)
        try:
            described = await self._call(self._engine.check_lora, str(staged), name)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        await asyncio.to_thread(self.registry.publish, staged, name, owner)
        return described

    async def delete(self, name: str, owner: Optional[str] = None) -> dict[str, Any]:
        await asyncio.to_thread(self.registry.delete, name, owner)
        return {"name": name, "object": "lora", "deleted": True}

    def check_request(self, loras: tuple[LoraRef, ...], param: str = "loras", owner: Optional[str] = None) -> None:
        """Every LoRA a request names exists and is `owner`'s to use (404 naming it otherwise)."""
        for index, lora in enumerate(loras):
            self.registry.path(lora.name, param=f"{param}.{index}.name", owner=owner)
