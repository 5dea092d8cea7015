"""The LoRA registry: `.safetensors` files in configured folders, read without torch.

Both sides use it: the ingress lists, saves and deletes files; the engine resolves a request's
LoRA names to files. Only safetensors are ever read (a header of JSON, then raw tensors): pickled
formats (`.bin`, `.ckpt`, `.pt`) run code when loaded and are refused by name. A file is described
from its header alone: its format (diffusers/PEFT or kohya), rank, the components it targets and
its size; whether it fits the served model is for the engine to say (`deployments/engine/lora.py`).

Folders: the uploads folder (`loras.dir`, writable) and, read-only, the examples shipped with
the tiny model. A name is unique across them.
"""

import json
import os
import re
import struct
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Optional

from configs.app_args import LorasConfig
from configs.model_spec import TINY_LORA_DIR
from configs.paths import PRIVATE_FILE_MODE, private_dir, write_private
from deployments.types import LORA_NAME_PATTERN, ConflictError, InvalidRequestError, NotFoundError, PayloadTooLargeError

SUFFIX = ".safetensors"
#: Extensions of pickled weight files: never read, refused by name.
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
_NAME = re.compile(LORA_NAME_PATTERN)
#: Largest safetensors header read (real LoRA headers are well under 1 MiB).
_MAX_HEADER_BYTES = 16 * 1024 * 1024

#: Key prefix → the SDXL component it targets (diffusers/PEFT keys, then kohya's).
_COMPONENTS = (
    ("unet.", "unet"), ("text_encoder.", "text_encoder"), ("text_encoder_2.", "text_encoder_2"),
    ("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"), ("lora_te_", "text_encoder"),
)
#: Key patterns of adapter types this server does not apply (they are not plain LoRAs).
_UNSUPPORTED = {
    r"\.hada_w1": "LoHa", r"\.lokr_w1": "LoKr", r"(dora_scale|lora_magnitude_vector)": "DoRA",
    r"\.oft_blocks": "OFT", r"^lora_.*\.diff$": "a full-weight difference",
}
#: Version of the owner record beside an uploaded LoRA (`.<name>.owner.json`).
_OWNER_VERSION = 1
_DOWN = re.compile(r"\.(lora_A|lora_down|lora\.down|lora_linear_layer\.down)\.weight$")


@dataclass(frozen=True)
class LoraFile:
    """What a LoRA file's header says."""

    name: str
    bytes: int
    format: str  # "diffusers" (PEFT keys) or "kohya"
    rank: int  # the largest rank of its layers
    components: tuple[str, ...]  # of "unet", "text_encoder", "text_encoder_2"
    layers: int
    builtin: bool

    def to_json(self) -> dict:
        return {**asdict(self), "components": list(self.components)}


def check_name(name: str, param: str = "name") -> str:
    """A valid LoRA name, or a 400 saying why; a pickled file's name gets its own answer."""
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise InvalidRequestError(
            f"{param} {name!r} is a pickle format; only .safetensors LoRAs are read (pickles run code when loaded)",
            param=param,
            code="unsupported_lora_format",
        )
    stem = name.removesuffix(SUFFIX)
    if not _NAME.match(stem):  # no separator can appear, so no name leaves its folder
        raise InvalidRequestError(
            f"{param} {name!r} is not a LoRA name: 1-64 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit (no paths)",
            param=param,
            code="invalid_lora_name",
        )
    return stem


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file; a 400 when the bytes are not one."""
    size = path.stat().st_size
    with path.open("rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise _not_safetensors("it is shorter than a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(_MAX_HEADER_BYTES, size - 8):
            raise _not_safetensors("its header length does not fit the file")
        try:
            header = json.loads(file.read(length))
        except ValueError:
            raise _not_safetensors("its header is not JSON") from None
    if not isinstance(header, dict):
        raise _not_safetensors("its header is not a table of tensors")
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + length + end > size:
        raise _not_safetensors("it is truncated")
    return header


def describe(path: Path, name: str, builtin: bool) -> LoraFile:
    """A LoRA file's format, rank and targets from its header; a 400 naming why it is not a LoRA
    this server applies."""
    header = read_header(path)
    keys = [key for key in header if key != "__metadata__"]
    for pattern, kind in _UNSUPPORTED.items():
        if any(re.search(pattern, key) for key in keys):
            raise InvalidRequestError(
                f"{name} is a {kind} adapter, not a plain LoRA (low-rank A/B pairs); it cannot be applied",
                param="file",
                code="unsupported_lora_format",
            )
    downs = [key for key in keys if _DOWN.search(key)]
    if not downs:
        raise InvalidRequestError(
            f"{name} has no LoRA weights (lora_A/lora_B or lora_down/lora_up tensors): is it a model checkpoint?",
            param="file",
            code="not_a_lora",
        )
    kohya = any(key.startswith("lora_") for key in downs)
    components = sorted({_component(key) for key in downs} - {""})
    if not components:
        raise InvalidRequestError(
            f"{name} targets no UNet or text encoder of an SDXL model (its keys start {downs[0].split('.')[0]!r})",
            param="file",
            code="not_a_lora",
        )
    return LoraFile(
        name=name,
        bytes=path.stat().st_size,
        format="kohya" if kohya else "diffusers",
        rank=max(int(header[key]["shape"][0]) for key in downs),
        components=tuple(components),
        layers=len(downs),
        builtin=builtin,
    )


def _component(key: str) -> str:
    return next((component for prefix, component in _COMPONENTS if key.startswith(prefix)), "")


def _taken(name: str) -> ConflictError:
    return ConflictError(f"LoRA {name!r} already exists; delete it first", param="name", code="lora_exists")


def _not_safetensors(why: str) -> InvalidRequestError:
    return InvalidRequestError(f"the file is not a safetensors file: {why}", param="file", code="invalid_lora_file")


class LoraRegistry:
    """The LoRA files of one deployment: an uploads folder and read-only example folders."""

    def __init__(self, uploads: Path, builtin: tuple[Path, ...] = ()):
        self.uploads = Path(uploads)
        self.builtin = tuple(Path(folder) for folder in builtin)

    def _files(self) -> dict[str, tuple[Path, bool]]:
        files: dict[str, tuple[Path, bool]] = {}
        for folder, builtin in [*((f, True) for f in self.builtin), (self.uploads, False)]:
            if folder.is_dir():
                for path in sorted(folder.glob(f"*{SUFFIX}")):
                    if _NAME.match(path.stem):  # staging files (".upload-...") start with a dot
                        files.setdefault(path.stem, (path, builtin))
        return files

    def names(self, owner: Optional[str] = None) -> list[str]:
        """Every LoRA's name; with `owner`, those it may see (`visible`)."""
        return sorted(name for name in self._files() if self.visible(name, owner))

    def path(self, name: str, param: str = "name", owner: Optional[str] = None) -> Path:
        """The file of a LoRA `owner` may see (None: anyone's); 404 otherwise, the same answer as
        for a name that does not exist."""
        stem = check_name(name, param)
        for folder in (*self.builtin, self.uploads):
            candidate = folder / f"{stem}{SUFFIX}"
            if candidate.is_file() and (folder != self.uploads or self.visible(stem, owner)):
                return candidate
        raise NotFoundError(f"LoRA {name!r} does not exist; GET /v1/loras lists them", param=param, code="lora_not_found")

    def owner_of(self, name: str) -> Optional[str]:
        """The API key an uploaded or trained LoRA belongs to (None: no one's, everyone's)."""
        path = self._owner_path(name)
        if not path.is_file():
            return None
        record = json.loads(path.read_text())
        if record.get("version") != _OWNER_VERSION:
            raise ValueError(f"{path} has version {record.get('version')!r}, not {_OWNER_VERSION}")
        return record["owner"]

    def visible(self, name: str, owner: Optional[str]) -> bool:
        """Whether `owner` (None: an admin, or auth off) may see and use LoRA `name`: the shipped
        examples and LoRAs made without a key are everyone's, the rest their key's only."""
        return owner is None or self.owner_of(name) in (None, owner)

    def _owner_path(self, name: str) -> Path:
        return self.uploads / f".{name}.owner.json"  # hidden: never listed as a LoRA

    def describe(self, name: str) -> LoraFile:
        path = self.path(name)
        return describe(path, name, builtin=path.parent in self.builtin)

    def stage(self, source: BinaryIO, limit: int) -> Path:
        """Copy an upload beside the registry's files under a hidden name, to be checked before
        it is published (`publish`) or removed; a 413 past `limit` bytes."""
        path = private_dir(self.uploads) / f".upload-{uuid.uuid4().hex}{SUFFIX}"
        written = 0
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE), "wb") as target:
            while chunk := source.read(1024 * 1024):
                written += len(chunk)
                if written > limit:
                    target.close()
                    path.unlink()
                    raise PayloadTooLargeError(
                        f"the LoRA file is over {limit} bytes (loras.max_upload_bytes)", param="file", code="file_too_large"
                    )
                target.write(chunk)
        return path

    def publish(self, staged: Path, name: str, owner: Optional[str] = None) -> Path:
        """Give a checked upload its name (and its owner, the API key it belongs to); 409 when the
        name is taken (names are unique across owners). The staged file is removed either way."""
        target = self.uploads / f"{name}{SUFFIX}"
        try:
            self.check_free(name)
            os.link(staged, target)  # atomic, and refuses an existing name: two uploads race safely
            if owner is not None:  # the winner of a race writes it (for the microseconds between, no one's)
                write_private(self._owner_path(name), json.dumps({"version": _OWNER_VERSION, "owner": owner}).encode())
        except FileExistsError:
            raise _taken(name) from None
        finally:
            staged.unlink(missing_ok=True)
        return target

    def check_free(self, name: str) -> None:
        """409 when a LoRA (anyone's, or a shipped one) already has this name."""
        if name in self._files():
            raise _taken(name)

    def delete(self, name: str, owner: Optional[str] = None) -> None:
        path = self.path(name, owner=owner)
        if path.parent != self.uploads:
            raise ConflictError(f"LoRA {name!r} ships with the server and cannot be deleted", param="name", code="lora_builtin")
        path.unlink()
        self._owner_path(name).unlink(missing_ok=True)

    def version(self, name: str, param: str = "name") -> int:
        """The file's modification time (ns): a LoRA replaced under the same name is a new one."""
        return self.path(name, param).stat().st_mtime_ns


def lora_registry(config: LorasConfig) -> LoraRegistry:
    """The registry a resolved `LorasConfig` describes (uploads folder, examples when asked)."""
    if config.dir is None:
        raise ValueError("loras.dir must be resolved first (AppArgs.with_state_paths)")
    return LoraRegistry(Path(config.dir), builtin=(TINY_LORA_DIR,) if config.examples else ())
