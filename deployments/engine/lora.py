"""LoRA adapters as rows of one forward: slot-batched LoRA layers and the per-replica adapter cache.

Each layer a LoRA targets is wrapped once (`SlotLayer`): beside the frozen layer it holds `slots`
low-rank pairs, zero-padded to `max_rank`, stacked in tensors. A forward gets one slot index per
batch row and adds `B[slot] @ A[slot] @ x` row by row (slot 0 is all zeros: the base model), so rows
with different adapters share one forward. No Python list of adapter names reaches the model,
only an index tensor, so a compiled graph is reused whatever the adapters (checked with dynamo on
CPU: a new composition of adapters does not recompile). A request's set of LoRAs with their
weights is one slot: its pairs concatenated along the rank, each B scaled by its weight and the
file's alpha/rank (an exact weighted sum: `B_cat @ A_cat = Σ w_i s_i B_i A_i`), what diffusers'
`set_adapters(names, weights)` computes.

Files are read with safetensors (never pickle) and converted by diffusers' own `lora_state_dict`
(kohya `lora_unet_…`/`lora_te1_…`/`lora_te2_…` keys, SGM block names included), then checked
against the served model: every target layer must exist with matching shapes.
"""

import json
import logging
import math
import re
import time
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from deployments.lora_registry import LoraRegistry, describe
from deployments.types import InvalidRequestError, LoraRef, ServiceError, live_loras

logger = logging.getLogger(__name__)

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_KEY = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)\.(lora_A|lora_B)\.weight$")


@dataclass
class LayerDelta:
    """One layer's low-rank pair: the layer's output gains `scale * up @ down @ x`."""

    down: torch.Tensor  # (r, in) or (r, in, kh, kw)
    up: torch.Tensor  # (out, r) or (out, r, 1, 1)
    scale: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


#: (component, module path) → its pair.
LoraWeights = dict[tuple[str, str], LayerDelta]


def read_lora(path: Any, unet_config: Any) -> LoraWeights:
    """A LoRA file's pairs by layer, in diffusers' module names (kohya files converted), each
    with its scale: alpha/rank, alpha from kohya's `.alpha` tensors or the PEFT config diffusers
    saves in the file's metadata (rank when neither gives one)."""
    from diffusers import StableDiffusionXLPipeline

    state_dict, alphas = StableDiffusionXLPipeline.lora_state_dict(load_file(str(path)), unet_config=unet_config)
    tensors = _to_peft_keys(state_dict)
    # kohya alphas sit beside a layer's down weight (or its module): carried through the same
    # conversion as a stand-in down weight, they land on the layer they belong to.
    network_alphas = {}
    for key, alpha in _to_peft_keys(
        {_alpha_as_down(key): torch.tensor(float(alpha)) for key, alpha in (alphas or {}).items()}
    ).items():
        network_alphas[key.rsplit(".lora_A.weight", 1)[0]] = float(alpha)
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise InvalidRequestError(f"the LoRA has a tensor this server cannot place: {key}", param="file", code="not_a_lora")
        component, module, kind = match.groups()
        pairs.setdefault((component, module), {})["down" if kind == "lora_A" else "up"] = tensor
    configs = _peft_configs(path)
    weights: LoraWeights = {}
    for (component, module), pair in pairs.items():
        if set(pair) != {"down", "up"}:
            raise InvalidRequestError(f"the LoRA's layer {module} lacks its up or down half", param="file", code="not_a_lora")
        rank = pair["down"].shape[0]
        config = configs.get(component, {})
        alpha = network_alphas.get(
            f"{component}.{module}", _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank))
        )
        scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        weights[(component, module)] = LayerDelta(pair["down"], pair["up"], scale)
    return weights


def _to_peft_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`component.module.lora_A.weight` keys, as diffusers converts each component's keys when it
    loads a LoRA (older attention-processor names and text-encoder names included)."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    by_component: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        component, _, rest = key.partition(".")
        by_component.setdefault(component, {})[rest] = tensor
    converted = {}
    for component, part in by_component.items():
        if component == "unet":
            part = convert_unet_state_dict_to_peft(part)
        else:
            part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
        converted.update({f"{component}.{key}": tensor for key, tensor in part.items()})
    return converted


def _alpha_as_down(key: str) -> str:
    """The down-weight key a kohya alpha key stands beside."""
    stem = key.removesuffix(".alpha")
    return stem if stem.endswith(".weight") else f"{stem}.lora.down.weight"


def _peft_configs(path: Any) -> dict[str, dict]:
    """The PEFT configs diffusers writes into a LoRA file's metadata, by component."""
    with safe_open(str(path), framework="pt") as file:
        raw = (file.metadata() or {}).get("lora_adapter_metadata")
    configs: dict[str, dict] = {}
    for key, value in (json.loads(raw) if raw else {}).items():
        component, _, name = key.partition(".")
        configs.setdefault(component, {})[name] = value
    return configs


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's per-module override: the first pattern that matches the module's name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


class _RowSlots:
    """The slot index of every batch row, for one component's layers during one forward."""

    def __init__(self):
        self.index: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class _Placement:
    """Where a LoRA's layer lands: the layer that holds its slots, and which of that layer's
    `parts` (a fused projection's q/k/v, each `out / parts` outputs and `max_rank` ranks) it is."""

    layer: str
    part: int = 0
    parts: int = 1


class SlotLayer(torch.nn.Module):
    """A Linear or Conv2d layer with `slots` zero-padded low-rank pairs, one per batch row.

    A fused projection (`optimize.fuse_qkv`: q, k, v as one Linear) has `parts` pairs per slot, one
    per projection it fused, each on its own slice of the outputs: the LoRAs of `to_q`, `to_k` and
    `to_v` apply to `to_qkv` exactly, as a block-diagonal update.
    """

    def __init__(self, base: torch.nn.Module, slots: int, rank: int, rows: _RowSlots, parts: int = 1):
        super().__init__()
        self.base = base
        self.rows = rows
        weight = base.weight
        if isinstance(base, torch.nn.Conv2d):
            down_shape = (slots, rank, base.in_channels, *base.kernel_size)
            out_features = base.out_channels
        else:
            down_shape = (slots, parts * rank, base.in_features)
            out_features = base.out_features
        self.register_buffer("down", torch.zeros(down_shape, dtype=weight.dtype, device=weight.device))
        self.register_buffer(
            "up", torch.zeros(slots, parts, out_features // parts, rank, dtype=weight.dtype, device=weight.device)
        )

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base(x, *args, **kwargs)
        if self.rows.index is None:  # no row of this forward has an adapter: the base layer, exactly
            return out
        index = self.rows.index
        down, up = self.down[index], self.up[index]
        if isinstance(self.base, torch.nn.Conv2d):
            batch, channels, height, width = x.shape
            rank = down.shape[1]
            hidden = F.conv2d(
                x.reshape(1, batch * channels, height, width),
                down.reshape(batch * rank, channels, *down.shape[3:]),
                None,
                self.base.stride,
                self.base.padding,
                self.base.dilation,
                groups=batch,
            )
            hidden = hidden.reshape(batch, rank, *hidden.shape[2:])
            return out + torch.einsum("brhw,bor->bohw", hidden, up[:, 0])
        hidden = torch.einsum("b...i,bri->b...r", x, down).unflatten(-1, (up.shape[1], up.shape[3]))
        return out + torch.einsum("b...pr,bpor->b...po", hidden, up).flatten(-2)


class LoraSlots:
    """The slot layers of one pipeline, written per slot.

    `targets` (full-match patterns on `component.module`) are wrapped at once, so memory is set at
    start and a compiled graph sees its final modules; other layers are wrapped when a LoRA first
    needs them, except in `frozen` components (compiled: a new module would recompile the graph).
    """

    def __init__(self, pipeline: Any, slots: int, max_rank: int, targets: tuple[str, ...] = (), frozen: tuple[str, ...] = ()):
        self._pipe = pipeline
        self.slots = slots
        self.max_rank = max_rank
        self._frozen = frozen
        self._rows = {component: _RowSlots() for component in COMPONENTS}
        self.layers: dict[tuple[str, str], SlotLayer] = {}
        self._prewrap([re.compile(pattern) for pattern in targets])

    def bytes(self) -> int:
        """Memory the slot buffers hold (every slot, every wrapped layer)."""
        return sum(buffer.numel() * buffer.element_size() for layer in self.layers.values() for buffer in (layer.down, layer.up))

    def check(self, weights: LoraWeights, name: str) -> None:
        """A 400 naming the first layer of `weights` the served model does not have or that does
        not fit (or, compiled, that has no slots)."""
        for (component, module), delta in weights.items():
            target = self._module(component, module)
            if target is None:
                raise InvalidRequestError(
                    f"LoRA {name!r} targets {component}.{module}, which the served model does not have: "
                    "it was made for another model",
                    param="loras",
                    code="lora_model_mismatch",
                )
            base = target.base if isinstance(target, SlotLayer) else target
            if not _fits(base, delta):
                raise InvalidRequestError(
                    f"LoRA {name!r} has shape {tuple(delta.down.shape)} / {tuple(delta.up.shape)} at {component}.{module}, "
                    f"which does not fit that layer: it was made for another model",
                    param="loras",
                    code="lora_model_mismatch",
                )
            if delta.rank > self.max_rank:
                raise InvalidRequestError(
                    f"LoRA {name!r} has rank {delta.rank}; this deployment applies ranks up to {self.max_rank} (loras.max_rank)",
                    param="loras",
                    code="lora_rank_too_high",
                )
            placement = self._place(component, module)
            if component in self._frozen and (component, placement.layer) not in self.layers:
                raise InvalidRequestError(
                    f"LoRA {name!r} targets {component}.{module}, which this deployment compiled without LoRA slots; "
                    "add the layer to loras.targets to serve it",
                    param="loras",
                    code="lora_layer_not_served",
                )

    def write(self, slot: int, parts: list[tuple[LoraWeights, float]]) -> None:
        """Fill `slot` with the weighted sum of `parts` (pairs concatenated along the rank)."""
        by_layer: dict[tuple[str, str], list[tuple[_Placement, LayerDelta, float]]] = {}
        for weights, weight in parts:
            for (component, module), delta in weights.items():
                placement = self._place(component, module)
                by_layer.setdefault((component, placement.layer), []).append((placement, delta, weight))
        for (component, layer), deltas in by_layer.items():
            for part in {placement.part for placement, _, _ in deltas}:
                rank = sum(delta.rank for placement, delta, _ in deltas if placement.part == part)
                if rank > self.max_rank:
                    raise InvalidRequestError(
                        f"the LoRAs together have rank {rank} at {component}.{layer}; this deployment applies ranks "
                        f"up to {self.max_rank} (loras.max_rank)",
                        param="loras",
                        code="lora_rank_too_high",
                    )
        for key, slot_layer in self.layers.items():
            if key not in by_layer:
                slot_layer.down[slot].zero_()
                slot_layer.up[slot].zero_()
        for (component, layer), deltas in by_layer.items():
            slot_layer = self._wrap(component, layer, deltas[0][0].parts)
            down, up = slot_layer.down[slot], slot_layer.up[slot]
            down.zero_()
            up.zero_()
            filled = [0] * deltas[0][0].parts
            for placement, delta, weight in deltas:
                start = placement.part * self.max_rank + filled[placement.part]
                end = start + delta.rank
                rows = slice(filled[placement.part], filled[placement.part] + delta.rank)
                down[start:end] = delta.down.reshape(down[start:end].shape).to(down)
                up[placement.part, :, rows] = (delta.up.reshape(up.shape[1], delta.rank) * (weight * delta.scale)).to(up)
                filled[placement.part] += delta.rank

    @contextmanager
    def active(self, index: torch.Tensor, components: tuple[str, ...] = COMPONENTS) -> Iterator[None]:
        """During the block, row i of a forward through `components` uses slot `index[i]`."""
        for component in components:
            self._rows[component].index = index
        try:
            yield
        finally:
            for component in components:
                self._rows[component].index = None

    def _prewrap(self, targets: list[re.Pattern]) -> None:
        for component in COMPONENTS:
            root = getattr(self._pipe, component, None)
            if root is None or not targets:
                continue
            names = [
                name
                for name, module in root.named_modules()
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
                and any(pattern.fullmatch(f"{component}.{name}") for pattern in targets)
            ]
            for name in names:
                placement = self._place(component, name)
                self._wrap(component, placement.layer, placement.parts)

    def _wrap(self, component: str, layer_name: str, parts: int) -> SlotLayer:
        layer = self.layers.get((component, layer_name))
        if layer is None:
            root = getattr(self._pipe, component)
            parent_name, _, child = layer_name.rpartition(".")
            parent = root.get_submodule(parent_name) if parent_name else root
            base = getattr(parent, child)
            layer = SlotLayer(base, self.slots, self.max_rank, self._rows[component], parts)
            setattr(parent, child, layer)
            self.layers[(component, layer_name)] = layer
        return layer

    def _place(self, component: str, module: str) -> _Placement:
        """The layer holding `module`'s slots: itself, or the fused projection that replaced it
        (diffusers fuses a self-attention's q, k, v into `to_qkv`, a cross-attention's k, v into
        `to_kv`)."""
        parent, _, leaf = module.rpartition(".")
        attention = self._module(component, parent)
        if leaf in ("to_q", "to_k", "to_v") and getattr(attention, "fused_projections", False):
            if not attention.is_cross_attention:
                return _Placement(f"{parent}.to_qkv", ("to_q", "to_k", "to_v").index(leaf), 3)
            if leaf != "to_q":
                return _Placement(f"{parent}.to_kv", ("to_k", "to_v").index(leaf), 2)
        return _Placement(module)

    def _module(self, component: str, module: str) -> Optional[torch.nn.Module]:
        root = getattr(self._pipe, component, None)
        if root is None:
            return None
        try:
            return root.get_submodule(module)
        except AttributeError:
            return None


def _fits(base: torch.nn.Module, delta: LayerDelta) -> bool:
    if isinstance(base, torch.nn.Conv2d):
        return (
            delta.down.shape[1] == base.in_channels
            and tuple(delta.down.shape[2:]) in ((), tuple(base.kernel_size))
            and delta.up.shape[0] == base.out_channels
            and base.groups == 1
        )
    if isinstance(base, torch.nn.Linear):
        return delta.down.dim() == 2 and delta.down.shape[1] == base.in_features and delta.up.shape[0] == base.out_features
    return False




class AdapterObserver(Protocol):
    """What the adapter cache tells its host (the Ray replica exports these as metrics)."""

    def on_lora_load(self, seconds: float, resident: int) -> None: ...

    def on_lora_hit(self) -> None: ...

    def on_lora_evict(self, resident: int) -> None: ...


class _NoAdapterObserver:
    def on_lora_load(self, seconds: float, resident: int) -> None:
        pass

    def on_lora_hit(self) -> None:
        pass

    def on_lora_evict(self, resident: int) -> None:
        pass


class AdapterCache:
    """The adapter sets resident on one replica, one slot each, least recently used evicted.

    Slot 0 is the base model. A set in use by a running row is pinned and never evicted; a cached
    set is served without reading its files again.
    """

    def __init__(
        self,
        pipeline: Any,
        registry: LoraRegistry,
        size: int,
        max_rank: int,
        targets: tuple[str, ...] = (),
        frozen: tuple[str, ...] = (),
        observer: Optional["AdapterObserver"] = None,
    ):
        """`targets`, `frozen`: as `LoraSlots` takes them; `observer` hears of loads, hits and
        evictions (the replica's metrics)."""
        self._pipe = pipeline
        self._registry = registry
        self.size = size
        self.slots = LoraSlots(pipeline, size + 1, max_rank, targets, frozen)
        self._observer = observer or _NoAdapterObserver()
        #: (name, file version) → None when it fits the served model, else why not.
        self._fits: dict[tuple[str, int], Optional[str]] = {}
        self._resident: OrderedDict[tuple, int] = OrderedDict()  # set → slot, least recent first
        self._pins: dict[int, int] = {}
        self._free = list(range(size, 0, -1))
        self.counts = {"loads": 0, "hits": 0, "evictions": 0, "load_s": 0.0}

    def acquire(self, loras: tuple[LoraRef, ...]) -> int:
        """The slot of a request's LoRAs (0 for none), loaded if it is not resident; pinned until
        `release`. Raises `InvalidRequestError`/`NotFoundError` for LoRAs that cannot be applied."""
        key = self._key(loras)
        if not key:
            return 0
        slot = self._resident.get(key)
        if slot is not None:
            self._resident.move_to_end(key)
            self.counts["hits"] += 1
            self._observer.on_lora_hit()
        else:
            slot = self._load(key)
        self._pins[slot] = self._pins.get(slot, 0) + 1
        return slot

    def release(self, slot: int) -> None:
        if slot:
            self._pins[slot] -= 1

    def weights(self, name: str) -> LoraWeights:
        """A registered LoRA's pairs, checked against the served model (400 naming why not)."""
        weights = read_lora(self._registry.path(name, param="loras"), self._pipe.unet.config)
        self.slots.check(weights, name)
        return weights

    def describe_file(self, path: Any, name: str) -> dict[str, Any]:
        """An uploaded file's header description, checked against the served model (400 if not)."""
        described = describe(Path(path), name, builtin=False)
        self.slots.check(read_lora(path, self._pipe.unet.config), name)
        return {**described.to_json(), "fits": True}

    def describe_all(self) -> list[dict[str, Any]]:
        """Every registered LoRA's description and whether it fits (cached per file version)."""
        listed = []
        for name in self._registry.names():
            try:
                described = self._registry.describe(name).to_json()
                key = (name, self._registry.version(name))
                if key not in self._fits:
                    try:
                        self.weights(name)
                        self._fits[key] = None
                    except ServiceError as error:
                        self._fits[key] = error.message
                listed.append({**described, "fits": self._fits[key] is None, "error": self._fits[key]})
            except ServiceError as error:  # a file dropped into the folder that is not a LoRA
                listed.append({"name": name, "fits": False, "error": error.message})
        return listed

    @contextmanager
    def zero_slot(self) -> Iterator[int]:
        """A free slot that stays all zeros during the block: warming a compiled UNet's adapter
        graph up without a LoRA file (its rows compute the base image)."""
        slot = self._free_slot()
        self.slots.write(slot, [])
        try:
            yield slot
        finally:
            self._free.append(slot)

    def stats(self) -> dict[str, Any]:
        return {
            **self.counts,
            "load_s": round(self.counts["load_s"], 4),
            "slot_bytes": self.slots.bytes(),
            "resident": len(self._resident),
            "resident_sets": [{name: weight for name, weight, _ in key} for key in self._resident],
        }

    def _key(self, loras: tuple[LoraRef, ...]) -> tuple:
        """A set's identity (`live_loras`), each LoRA with its file's version, so a file replaced
        under the same name is loaded again."""
        return tuple((name, weight, self._registry.version(name, param="loras")) for name, weight in live_loras(loras))

    def _load(self, key: tuple) -> int:
        started = time.perf_counter()
        parts = [(self.weights(name), weight) for name, weight, _ in key]
        slot = self._free_slot()
        self.slots.write(slot, parts)
        self._resident[key] = slot
        seconds = time.perf_counter() - started
        self.counts["loads"] += 1
        self.counts["load_s"] += seconds
        self._observer.on_lora_load(seconds, len(self._resident))
        logger.info("LoRA set %s loaded into slot %d in %.3fs", [(n, w) for n, w, _ in key], slot, seconds)
        return slot

    def _free_slot(self) -> int:
        if self._free:
            return self._free.pop()
        for key, slot in self._resident.items():  # least recently used first
            if not self._pins.get(slot):
                del self._resident[key]
                self.counts["evictions"] += 1
                self._observer.on_lora_evict(len(self._resident))
                return slot
        raise InvalidRequestError(
            "every LoRA slot of this replica is in use by running requests; retry, or raise loras.cache_size",
            param="loras",
            code="lora_slots_busy",
        )


def rows_on_slots(cache: Optional[AdapterCache], slots: list[int], device: Any, components: tuple[str, ...]):
    """The context a forward runs in: row i on slot `slots[i]`; none when no row has one (the
    layers then run as the base model, exactly)."""
    if cache is None or not any(slots):
        return nullcontext()
    return cache.slots.active(torch.tensor(slots, device=device), components)
