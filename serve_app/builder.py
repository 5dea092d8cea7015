"""The one app builder: `build_app(args) -> Application`, which `serve_config.yaml` imports.

    applications:
      - name: sdxl
        import_path: serve_app.builder:build_app
        args: {model: {source: tiny}, batching: {max_batch_size: 8}}

`args` is validated as `configs.app_args.AppArgs` (unknown keys are errors). The graph is an
ingress deployment holding a registry of engine handles by role (`{"base": ..., "controlnet:<variant>":
...}`: the base pipeline and one deployment per ControlNet variant, each with its own replicas) and the
job manager's handle (one replica, which owns the job store and also calls the engines).

Every hop has a bound, so overload is refused fast instead of queued without end: the proxy holds
at most `ingress.max_queued_requests` requests for a busy ingress replica, each caller of an engine
at most `engine.max_queued_requests` requests for a busy engine replica; beyond them the answer is
503 with `Retry-After`.
"""

from typing import Any, Optional

from ray.serve import Application
from ray.serve.config import BackpressureConfig

from configs.app_args import AppArgs, EngineDeploymentConfig, controlnet_deployment_name, controlnet_role
from deployments.engine.factory import EngineFactory
from deployments.replica import EngineDeployment
from deployments.types import BASE_ROLE
from serve_app.errors import RETRY_AFTER_S
from serve_app.ingress import ImageIngress
from serve_app.jobs.manager import JobManagerDeployment

#: Requests an engine replica accepts, in batches: one running, one waiting to join it.
_BATCHES_IN_FLIGHT = 2


def build_app(args: Optional[dict[str, Any]] = None) -> Application:
    """Validate `args` and bind the deployment graph."""
    config = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    config = config.with_state_paths()
    engines = {
        role: _engine_deployment(config, name, placement, controlnets)
        for role, (name, placement, controlnets) in engine_roles(config).items()
    }
    jobs = JobManagerDeployment.options(ray_actor_options={"num_cpus": config.jobs.num_cpus}).bind(
        engines, config.jobs.model_dump(mode="json"), config.controlnet_roles()
    )
    return ImageIngress.options(
        num_replicas=config.ingress.num_replicas,
        max_ongoing_requests=config.ingress.max_ongoing_requests,
        max_queued_requests=config.ingress.max_queued_requests,
        # Ray's proxy answers these itself (plain text, not the JSON envelope): tell clients when.
        backpressure_config=BackpressureConfig(retry_after_s=RETRY_AFTER_S),
        ray_actor_options={"num_cpus": config.ingress.num_cpus},
    ).bind(engines, jobs, config.model_dump(mode="json"))


def engine_roles(config: AppArgs) -> dict[str, tuple[str, EngineDeploymentConfig, Optional[dict[str, Any]]]]:
    """The registry the graph binds, from resolved args: role → (deployment name, placement, the
    ControlNets it hosts as spec dicts). The base, then one deployment per ControlNet variant."""
    roles: dict[str, tuple[str, EngineDeploymentConfig, Optional[dict[str, Any]]]] = {BASE_ROLE: ("SDXLBase", config.engine, None)}
    for variant, variant_config in (config.controlnets or {}).items():
        models = {name: spec.model_dump(mode="json") for name, spec in variant_config.models.items()}
        roles[controlnet_role(variant)] = (controlnet_deployment_name(variant), variant_config.engine, models)
    return roles


def _engine_deployment(
    config: AppArgs, name: str, placement: EngineDeploymentConfig, controlnets: Optional[dict[str, Any]]
) -> Application:
    """One engine deployment: the base model (plus `controlnets`) on its own replicas."""
    in_flight = config.batching.max_batch_size * _BATCHES_IN_FLIGHT
    options: dict[str, Any] = {
        "name": name,
        "ray_actor_options": {"num_gpus": placement.num_gpus, "num_cpus": placement.num_cpus},
        # The engine admits from what the replica has been sent: a running batch and the next.
        "max_ongoing_requests": in_flight,
        "max_queued_requests": placement.max_queued_requests,
    }
    if placement.autoscaling is not None:
        scaling = placement.autoscaling
        options["autoscaling_config"] = {
            "min_replicas": scaling.min_replicas,
            "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
            "upscale_delay_s": scaling.upscale_delay_s,
            "downscale_delay_s": scaling.downscale_delay_s,
        }
    else:
        options["num_replicas"] = placement.num_replicas
    model = config.model.model_dump(mode="json")
    # `limits.max_loras: 0` serves no LoRAs: the engine then gets no slot layers, so no slot memory
    # and no second (adapter) graph per bucket for a compiled UNet to build at start.
    loras = config.loras.model_dump(mode="json") if config.limits.max_loras > 0 else None
    factory = EngineFactory(
        model, config.batching.model_dump(mode="json"), max_waiting=in_flight, loras=loras, controlnets=controlnets
    )
    return EngineDeployment.options(**options).bind(model, config.limits.model_dump(mode="json"), factory)
