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
    # The ingress replica validates the resolved args again, from a dump (autoscaled deployments
    # among them: their dump must not name num_replicas too).
    assert AppArgs.model_validate(args.with_state_paths().model_dump(mode="json")) == args.with_state_paths()
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


# --- ControlNet variants -------------------------------------------------------------------------


def test_the_tiny_model_gets_its_canny_variant_and_others_none_by_default():
    tiny = AppArgs().with_state_paths()
    assert tiny.controlnet_roles() == {"canny": "controlnet:canny", "silhouette": "controlnet:silhouette"}
    real = AppArgs.model_validate({"model": {"source": "pretrained", "path": "/models/sdxl"}}).with_state_paths()
    assert real.controlnet_roles() == {}
    assert AppArgs.model_validate({"controlnets": {}}).with_state_paths().controlnet_roles() == {}


@pytest.mark.parametrize(
    "controlnets, message",
    [
        ({"a": {"models": {"canny": {"source": "tiny"}}}, "b": {"models": {"canny": {"source": "tiny"}}}}, "hosted by both"),
        ({"bad/name": {"models": {"canny": {"source": "tiny"}}}}, "variant 'bad/name'"),
        ({"a": {"models": {}}}, "at least 1"),
        ({"a": {"models": {"x": {"source": "sdxl-arch"}}}}, "must match its base model"),
    ],
    ids=["hosted-twice", "variant-name", "no-models", "architecture"],
)
def test_bad_controlnet_configs_fail_naming_the_problem(controlnets, message):
    with pytest.raises(ValueError, match=message):
        AppArgs.model_validate({"controlnets": controlnets})


def test_a_pretrained_controlnet_folder_loads_as_the_tiny_one():
    import torch

    from configs.model_spec import TINY_CONTROLNET_CANNY_DIR, PretrainedControlNetSpec, TinyControlNetSpec
    from deployments.pipelines import load_controlnet

    cpu = torch.device("cpu")
    folder = load_controlnet(PretrainedControlNetSpec(source="pretrained", path=str(TINY_CONTROLNET_CANNY_DIR), local_files_only=True), cpu, torch.float32)
    shipped = load_controlnet(TinyControlNetSpec(), cpu, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(folder.state_dict().values(), shipped.state_dict().values()))
    assert not folder.training


def test_the_builder_binds_one_engine_deployment_per_variant():
    from serve_app.builder import engine_roles

    config = AppArgs.model_validate(
        {
            "controlnets": {"canny": {"models": {"canny": {"source": "tiny"}}, "engine": {"num_gpus": 0.5, "num_replicas": 2}}},
            "refiner": {"engine": {"num_gpus": 0.25}},
        }
    ).with_state_paths()
    roles = engine_roles(config)
    assert list(roles) == ["base", "controlnet:canny", "refiner"]
    variant = roles["controlnet:canny"]
    assert variant.name == "SDXLControlNet-canny" and variant.placement.num_gpus == 0.5 and variant.placement.num_replicas == 2
    assert variant.controlnets == {"canny": {"source": "tiny", "map": "canny"}} and roles["base"].controlnets is None
    assert roles["refiner"].name == "SDXLRefiner" and roles["refiner"].refiner == {"source": "tiny"}
    assert roles["refiner"].placement.num_gpus == 0.25 and roles["base"].refiner is None


def test_the_refiner_defaults_to_the_tiny_one_for_the_tiny_model_only():
    assert AppArgs().with_state_paths().refiner.model.source == "tiny"
    assert AppArgs.model_validate({"refiner": False}).with_state_paths().refiner is False
    assert AppArgs.model_validate({"model": {"source": "sdxl-arch"}}).with_state_paths().refiner is False
    with pytest.raises(ValueError, match="must match its base model"):
        AppArgs.model_validate({"refiner": {"model": {"source": "sdxl-arch"}}})


def test_a_single_file_controlnet_loads_as_the_folder(tmp_path):
    """SDXL ControlNets ship as one file in diffusers' key layout (lllyasviel/sd_control_collection's
    `diffusers_xl_*.safetensors`); `from_single_file` reads it with the folder's config offline."""
    import torch
    from safetensors.torch import save_file

    from configs.model_spec import TINY_CONTROLNET_CANNY_DIR, SingleFileControlNetSpec, TinyControlNetSpec
    from deployments.pipelines import load_controlnet

    cpu = torch.device("cpu")
    shipped = load_controlnet(TinyControlNetSpec(), cpu, torch.float32)
    path = tmp_path / "diffusers_xl_canny_tiny.safetensors"
    save_file({key: value.contiguous() for key, value in shipped.state_dict().items()}, str(path))
    spec = SingleFileControlNetSpec(source="single_file", path=str(path), config=str(TINY_CONTROLNET_CANNY_DIR), local_files_only=True)
    loaded = load_controlnet(spec, cpu, torch.float32)
    assert loaded.state_dict().keys() == shipped.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), shipped.state_dict().values()))
