"""LoRA files the tests write: a random attention LoRA with its PEFT config in the metadata (alpha
≠ rank), a text-encoder LoRA, the shipped pastel LoRA in kohya's format, and files that must be
refused (another model's shapes, a LoHa, a checkpoint, garbage)."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from configs.model_spec import TINY_LORA_DIR

PASTEL = TINY_LORA_DIR / "pastel.safetensors"


def _modules(module: torch.nn.Module, suffixes: tuple[str, ...]) -> list[tuple[str, torch.nn.Linear]]:
    return [(name, m) for name, m in module.named_modules() if isinstance(m, torch.nn.Linear) and name.endswith(suffixes)]


def attention_lora(pipe, path: Path, rank: int = 4, alpha: float = 8.0, seed: int = 0) -> Path:
    """A random LoRA on every attention projection of the UNet, in diffusers' PEFT format with the
    PEFT config diffusers writes into the metadata (so its scale is alpha / rank = 2)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, linear in _modules(pipe.unet, ("to_q", "to_k", "to_v", "to_out.0")):
        tensors[f"unet.{name}.lora_A.weight"] = torch.randn(rank, linear.in_features, generator=generator) * 0.2
        tensors[f"unet.{name}.lora_B.weight"] = torch.randn(linear.out_features, rank, generator=generator) * 0.2
    config = {"unet.r": rank, "unet.lora_alpha": alpha, "unet.target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}
    save_file(tensors, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config)})
    return path


def text_encoder_lora(pipe, path: Path, rank: int = 4, seed: int = 1) -> Path:
    """A random LoRA on the second text encoder's q and v projections (no metadata: scale 1)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, linear in _modules(pipe.text_encoder_2, ("q_proj", "v_proj")):
        tensors[f"text_encoder_2.{name}.lora_A.weight"] = torch.randn(rank, linear.in_features, generator=generator) * 0.3
        tensors[f"text_encoder_2.{name}.lora_B.weight"] = torch.randn(linear.out_features, rank, generator=generator) * 0.3
    save_file(tensors, str(path))
    return path


def kohya_pastel(path: Path) -> Path:
    """The shipped pastel LoRA with kohya's key names and alphas: the same weights."""
    raw = load_file(str(PASTEL))
    tensors = {}
    for key, tensor in raw.items():
        module = key.removeprefix("unet.").rsplit(".lora_", 1)[0]
        stem = "lora_unet_" + module.replace(".", "_")
        tensors[f"{stem}.{'lora_down' if '.lora_A.' in key else 'lora_up'}.weight"] = tensor
        tensors[f"{stem}.alpha"] = torch.tensor(float(raw[key.replace("lora_B", "lora_A")].shape[0]))
    save_file(tensors, str(path))
    return path


def wrong_model(path: Path) -> Path:
    """Pastel with one layer's shapes from another model."""
    raw = load_file(str(PASTEL))
    key = next(key for key in raw if key.endswith("attn1.to_q.lora_A.weight"))
    raw[key] = torch.zeros(raw[key].shape[0], raw[key].shape[1] * 2)
    save_file(raw, str(path))
    return path


def loha(path: Path) -> Path:
    save_file({"lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a": torch.zeros(4, 4)}, str(path))
    return path


def checkpoint(path: Path) -> Path:
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}, str(path))
    return path
