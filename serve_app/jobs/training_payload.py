"""What a LoRA training job runs, and its durable form: versioned JSON (examples as lossless PNG).

The settings are stored resolved (`LoraTrainingSettings.with_defaults`), so every attempt of the
job, and a resume from its checkpoint, trains the same run.
"""

from dataclasses import dataclass
from typing import Any

from deployments.training import LoraTrainingSettings, TrainingExample
from serve_app.jobs.payload import png_base64, png_pixels

#: Bump when the layout below changes; `from_json` refuses versions it does not know.
TRAINING_PAYLOAD_VERSION = 1

#: The job kind of a training job (`GET /v1/jobs/{id}` → `kind`).
TRAINING_KIND = "lora_training"


@dataclass
class TrainingPayload:
    settings: LoraTrainingSettings
    examples: list[TrainingExample]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": TRAINING_PAYLOAD_VERSION,
            "settings": self.settings.model_dump(mode="json"),
            "examples": [{"image": png_base64(example.image), "caption": example.caption} for example in self.examples],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TrainingPayload":
        if data.get("version") != TRAINING_PAYLOAD_VERSION:
            raise ValueError(f"training payload version {data.get('version')!r} is not {TRAINING_PAYLOAD_VERSION}")
        return cls(
            settings=LoraTrainingSettings.model_validate(data["settings"]),
            examples=[TrainingExample(png_pixels(item["image"]), item["caption"]) for item in data["examples"]],
        )
