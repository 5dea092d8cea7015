"""The README's configuration reference names every AppArgs and model-spec field."""

from pathlib import Path

import pytest

from configs.app_args import AppArgs
from configs.model_spec import ModelSpec

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
    return sorted(set(keys))


@pytest.mark.parametrize("key", _keys())
def test_config_key_is_documented(key):
    assert f"`{key}`" in README
