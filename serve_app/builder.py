"""The one app builder: `build_app(args) -> Application`, which `serve_config.yaml` imports.

    applications:
      - name: sdxl
        import_path: serve_app.builder:build_app
        args: {model: {source: tiny}, batching: {max_batch_size: 8}}

`args` is validated as `configs.app_args.AppArgs` (unknown keys are errors). The graph is an
ingress deployment holding a registry of engine handles by role (`{"base": ..., "controlnet:<variant>":
..., "refiner": ...}`: the base pipeline, one deployment per ControlNet variant and the refiner, each
with its own replicas) and the
job manager's handle (one replica, which owns the job store and also calls the engines).

Every hop has a bound, so overload is refused fast instead of queued without end: the proxy holds
at most `ingress.max_queued_requests` requests for a busy ingress replica, each caller of an engine
at most `engine.max_queued_requests` requests for a busy engine replica; beyond them the answer is
503 with `Retry-After`.
"""

from typing import Any, NamedTuple, Optional

from ray.serve import Application
from ray.serve.config import BackpressureConfig

from configs.app_args import AppArgs, EngineDeploymentConfig, controlnet_deployment_name, controlnet_role
from deployments.engine.factory import EngineFactory
from deployments.replica import EngineDeployment
from deployments.types import BASE_ROLE, REFINER_ROLE
from serve_app.errors import RETRY_AFTER_S
from serve_app.ingress import ImageIngress
from serve_app.jobs.manager import JobManagerDeployment

#: Requests an engine replica accepts, in batches: one running, one waiting to join it.
_BATCHES_IN_FLIGHT = 2
BASE_DEPLOYMENT = "SDXLBase"


def build_app(args: Optional[dict[str, Any]] = None) -> Application:
    """Validate `args` and bind the deployment graph."""
    config = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    config = config.with_state_paths()
    engines = {role: _engine_deployment(config, deployment) for role, deployment in engine_roles(config).items()}
    jobs = JobManagerDeployment.options(ray_actor_options={"num_cpus": config.jobs.num_cpus}).bind(
        engines, config.jobs.model_dump(mode="json"), config.controlnet_roles(), config.loras.routing
    )
    return ImageIngress.options(
        num_replicas=config.ingress.num_replicas,
        max_ongoing_requests=config.ingress.max_ongoing_requests,
        max_queued_requests=config.ingress.max_queued_requests,
        # Ray's proxy answers these itself (plain text, not the JSON envelope): tell clients when.
        backpressure_config=BackpressureConfig(retry_after_s=RETRY_AFTER_S),
        ray_actor_options={"num_cpus": config.ingress.num_cpus},
    ).bind(engines, jobs, config.model_dump(mode="json"))


class EngineRole(NamedTuple):
    """One engine deployment of the graph."""

    name: str
    placement: EngineDeploymentConfig
    #: The ControlNets it hosts, name → spec dict (a ControlNet variant); None otherwise.
    controlnets: Optional[dict[str, Any]] = None
    #: The refiner's spec dict (the refiner); None otherwise.
    refiner: Optional[dict[str, Any]] = None


def engine_roles(config: AppArgs) -> dict[str, EngineRole]:
    """The registry the graph binds, from resolved args: role → deployment. The base, one
    deployment per ControlNet variant, and the refiner when there is one."""
    roles = {BASE_ROLE: EngineRole(BASE_DEPLOYMENT, config.engine)}
    for variant, variant_config in (config.controlnets or {}).items():
        models = {name: spec.model_dump(mode="json") for name, spec in variant_config.models.items()}
        roles[controlnet_role(variant)] = EngineRole(controlnet_deployment_name(variant), variant_config.engine, controlnets=models)
    if config.refiner:
        roles[REFINER_ROLE] = EngineRole("SDXLRefiner", config.refiner.engine, refiner=config.refiner.model.model_dump(mode="json"))
    return roles


def _engine_deployment(config: AppArgs, deployment: EngineRole) -> Application:
    """One engine deployment: the base model (plus its ControlNets), or the refiner, on its own replicas."""
    placement = deployment.placement
    in_flight = config.batching.max_batch_size * _BATCHES_IN_FLIGHT
    options: dict[str, Any] = {
        "name": deployment.name,
        "ray_actor_options": {"num_gpus": placement.num_gpus, "num_cpus": placement.num_cpus},
        # The engine admits from what the replica has been sent: a running batch and the next.
        "max_ongoing_requests": in_flight,
        "max_queued_requests": placement.max_queued_requests,
        # A stopping replica gets no new requests and finishes the rows it holds (its engine loop
        # runs until Ray calls `__del__` after the drain).
        "graceful_shutdown_timeout_s": placement.graceful_shutdown_timeout_s,
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
    # The refiner takes no LoRAs (they are trained for the base's UNet): its stage runs without.
    serves_loras = config.limits.max_loras > 0 and deployment.refiner is None
    loras = config.loras.model_dump(mode="json") if serves_loras else None
    # The base deployment trains LoRAs when idle (`POST /v1/loras/train`): a variant's ControlNets
    # and the refiner play no part in a base LoRA, and each training run loads its own pipeline.
    trains = deployment.name == BASE_DEPLOYMENT and config.trains_loras()
    factory = EngineFactory(
        model,
        config.batching.model_dump(mode="json"),
        max_waiting=in_flight,
        loras=loras,
        controlnets=deployment.controlnets,
        refiner=deployment.refiner,
        training=config.training.model_dump(mode="json") if trains else None,
    )
    return EngineDeployment.options(**options).bind(model, config.limits.model_dump(mode="json"), factory)
