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


def test_the_grafana_dashboard_charts_every_documented_metric():
    import json
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    dashboard = json.loads((root / "configs" / "grafana" / "sdxl-serve.json").read_text())
    charted = " ".join(target["expr"] for panel in dashboard["panels"] for target in panel["targets"])
    section = (root / "README.md").read_text().split("## Metrics\n", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(ray_sdxl_\w+)`", section, flags=re.M))
    assert len(documented) >= 15
    assert {name for name in documented if name not in charted} == set()
