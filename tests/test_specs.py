"""Typed configuration: model specs, app args and scheduler names reject bad input by name."""

import pytest
import yaml
from pydantic import TypeAdapter, ValidationError

from configs.app_args import AppArgs, AutoscalingConfig
from configs.model_spec import ModelSpec, PretrainedSpec, SingleFileSpec, TinySpec
from configs.schedulers import SCHEDULERS, canonical_scheduler

spec_adapter = TypeAdapter(ModelSpec)


def test_defaults_serve_the_tiny_model_on_cpu_sizes():
    args = AppArgs()
    assert isinstance(args.model, TinySpec)
    assert args.model.default_size == (128, 128)
    assert args.batching.max_batch_size == 8


@pytest.mark.parametrize(
    "raw, kind",
    [
        ({"source": "tiny"}, TinySpec),
        ({"source": "pretrained", "path": "stabilityai/stable-diffusion-xl-base-1.0", "variant": "fp16"}, PretrainedSpec),
        ({"source": "single_file", "path": "/m/sdxl.safetensors", "config": "/m/cfg"}, SingleFileSpec),
    ],
)
def test_spec_variants(raw, kind):
    assert isinstance(spec_adapter.validate_python(raw), kind)


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"source": "tiny", "path": "x"}, "path"),  # a field that does not apply is an error
        ({"source": "pretrained"}, "path"),
        ({"source": "tiny", "dtype": "float64"}, "dtype"),
        ({"source": "tiny", "device": "tpu"}, "device"),
        ({"source": "tiny", "default_size": [100, 64]}, "default_size"),
        ({"source": "tiny", "default_scheduler": "nope"}, "default_scheduler"),
        ({"source": "magic"}, "source"),
    ],
)
def test_bad_specs_name_the_field(raw, field):
    with pytest.raises(ValidationError) as info:
        spec_adapter.validate_python(raw)
    assert field in str(info.value)


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"batching": {"max_batch_size": 0}}, "max_batch_size"),
        ({"batching": {"max_batch_size": 8, "typo": 1}}, "typo"),
        ({"engine": {"num_replicas": 2, "autoscaling": {"max_replicas": 2}}}, "autoscaling"),
        ({"engine": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}}, "min_replicas"),
        ({"limits": {"max_steps": 2}}, "default_steps"),
        ({"unknown_section": {}}, "unknown_section"),
    ],
)
def test_bad_app_args_name_the_field(raw, field):
    with pytest.raises(ValidationError) as info:
        AppArgs.model_validate(raw)
    assert field in str(info.value)


@pytest.mark.parametrize("path", ["serve_config.yaml", "configs/serve_config.gpu.yaml"])
def test_shipped_serve_configs_validate(path):
    """Both configs pass Ray Serve's own deploy schema and our typed args, and build a graph."""
    from ray.serve.schema import ServeDeploySchema

    from serve_app.builder import build_app

    config = yaml.safe_load(open(path))
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == "serve_app.builder:build_app"
    args = AppArgs.model_validate(app.args)
    assert build_app(app.args) is not None
    if "gpu" in path:
        assert args.engine.num_gpus == 1 and args.model.device == "cuda"


@pytest.mark.parametrize(
    "model",
    [AppArgs, AutoscalingConfig, *(type(getattr(AppArgs(), n)) for n in ("batching", "engine", "ingress", "limits")), *ModelSpec.__args__[0].__args__],
)
def test_every_field_is_described(model):
    undocumented = [name for name, field in model.model_fields.items() if not field.description and name != "source"]
    assert undocumented == []


@pytest.mark.parametrize(
    "name, expected",
    [("Euler a", "euler_a"), ("DPM++ 2M Karras", "dpmpp_2m_karras"), ("dpmpp_2m", "dpmpp_2m"), (" UniPC ", "unipc")],
)
def test_scheduler_aliases(name, expected):
    assert canonical_scheduler(name) == expected


def test_unknown_scheduler_is_quoted():
    with pytest.raises(ValueError, match="'warp drive'"):
        canonical_scheduler("warp drive")


def test_required_schedulers_present():
    assert {"euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim", "unipc"} <= set(SCHEDULERS)
