"""The LoRA fine-tuning contract, shared by the HTTP side and the engine: what a training job asks
for (`LoraTrainingSettings`, each field's bounds and docs defined once), its examples, and what a
training run streams back. No torch here.

A job's settings are resolved once (`with_defaults`: the resolution from the served model, the
seed drawn) before they are stored, so a retried or resumed job trains exactly the same run.
"""

from dataclasses import dataclass
from typing import Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from deployments.types import LORA_NAME_PATTERN, MAX_SEED, draw_seed

#: Fewest and most examples one job trains on (each `training.max_images` is at most this).
MIN_TRAINING_IMAGES = 1
MAX_TRAINING_IMAGES = 1000
#: Longest caption (characters) and trigger word.
MAX_CAPTION_CHARS = 1000
MAX_TRIGGER_CHARS = 64


class LoraTrainingSettings(BaseModel):
    """How to train one LoRA (`POST /v1/loras/train`'s fields besides the images)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(..., pattern=LORA_NAME_PATTERN, description="The new LoRA's name in `GET /v1/loras` (not taken).")
    rank: int = Field(16, ge=1, le=256, description="LoRA rank (at most `loras.max_rank`, which serving applies).")
    steps: int = Field(500, ge=1, le=100_000, description="Optimisation steps (at most `training.max_steps`).")
    learning_rate: float = Field(1e-4, gt=0.0, le=0.01, description="AdamW learning rate of the LoRA weights.")
    batch_size: int = Field(1, ge=1, le=64, description="Examples per step (at most the number of examples).")
    resolution: Optional[int] = Field(
        None,
        ge=64,
        le=2048,
        multiple_of=8,
        description="Side of the square each example is resized and centre-cropped to; default the model's default width.",
    )
    train_text_encoder: bool = Field(
        False, description="Also train LoRAs on both text encoders' attention (new words; more memory)."
    )
    trigger_word: Optional[str] = Field(
        None,
        min_length=1,
        max_length=MAX_TRIGGER_CHARS,
        pattern=r"^[^,\n]+$",
        description="Put in front of every caption ('<trigger>, <caption>'): prompts containing it call up the style.",
    )
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED, description="Seed of the initial weights, the noise and the order; default random.")

    def with_defaults(self, default_width: int) -> "LoraTrainingSettings":
        """Every default resolved: what a job stores, so each attempt runs the same training."""
        return self.model_copy(
            update={
                "resolution": self.resolution or default_width,
                "seed": draw_seed() if self.seed is None else self.seed,
            }
        )

    def caption(self, text: str) -> str:
        return f"{self.trigger_word}, {text}" if self.trigger_word else text


@dataclass(frozen=True)
class TrainingExample:
    """One training image (uint8 H×W×3, already `resolution` square) and its caption."""

    image: np.ndarray
    caption: str


@dataclass(frozen=True)
class TrainingProgress:
    """A training step finished (streamed by `train_stream` before the result). `paused`: the
    trainer is waiting for the engine to be idle (or for its hours) at this step."""

    step: int
    total: int
    loss: Optional[float]
    eta_s: Optional[float]
    paused: bool = False


@dataclass(frozen=True)
class TrainingResult:
    """The trained LoRA: its name, its `.safetensors` bytes (already published in the registry)
    and how training went."""

    name: str
    data: bytes
    steps: int
    loss: float
    train_s: float
    resumed_from: int
