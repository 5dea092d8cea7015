"""The README's configuration reference names every AppArgs, model-spec and ControlNet-spec field."""

from pathlib import Path

import pytest

from configs.app_args import AppArgs, ControlNetVariantConfig
from configs.model_spec import ControlNetSpec, ModelSpec

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _keys() -> list[str]:
    keys = []
    for section, field in AppArgs.model_fields.items():
        if section == "model":
            continue
        nested = getattr(field.annotation, "model_fields", None)
        keys.extend(f"{section}.{name}" for name in nested) if nested else keys.append(section)
    for spec in ModelSpec.__args__[0].__args__:
        keys.extend(f"model.{name}" for name in spec.model_fields)
    keys.extend(f"controlnets.<variant>.{name}" for name in ControlNetVariantConfig.model_fields)
    for spec in ControlNetSpec.__args__[0].__args__:  # documented by their own names in "ControlNets"
        keys.extend(spec.model_fields)
    return sorted(set(keys))


@pytest.mark.parametrize("key", _keys())
def test_config_key_is_documented(key):
    assert f"`{key}`" in README
