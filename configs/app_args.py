"""The typed arguments of `serve_app.builder.build_app`: what `serve_config.yaml` passes as `args:`.

Every field is described and bounded; unknown keys are rejected (`extra="forbid"`), so a typo in a
config file fails `serve run`/`serve deploy` instead of being silently ignored.
"""

import ipaddress
import re
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, field_validator, model_serializer, model_validator

from configs.model_spec import ControlNetSpec, ModelSpec, RefinerSpec, TinyControlNetSpec, TinyRefinerSpec, TinySpec
from configs.paths import state_root


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BatchingConfig(_Strict):
    """How an engine replica batches: requests are rows of one running denoising loop."""

    max_batch_size: int = Field(
        8,
        ge=1,
        le=64,
        description=(
            "Most requests denoising at once on a replica (rows of its running batch; a guided image "
            "is two UNet rows). The replica accepts twice this: a batch running, one waiting."
        ),
    )
    scheduling: Literal["step", "request"] = Field(
        "step",
        description=(
            "`step`: waiting requests join the running batch between denoising steps. `request`: "
            "they are admitted only into an empty engine (whole batches, as with request-level "
            "batching), kept for comparison."
        ),
    )
    batch_wait_timeout_s: float = Field(
        0.05,
        ge=0.0,
        le=10.0,
        description="`request` scheduling: how long an idle engine waits for a batch to form. `step` admits at once.",
    )


class AutoscalingConfig(_Strict):
    """Ray Serve autoscaling of the GPU deployment (replicas = GPUs in use)."""

    min_replicas: int = Field(1, ge=0, le=1024, description="Replicas kept even when idle.")
    max_replicas: int = Field(1, ge=1, le=1024, description="Most replicas autoscaling may start.")
    target_ongoing_requests: float = Field(
        8.0, gt=0, le=1024, description="Ongoing requests per replica that autoscaling aims for."
    )
    upscale_delay_s: float = Field(10.0, ge=0, le=3600, description="Sustained load before scaling up.")
    downscale_delay_s: float = Field(300.0, ge=0, le=86400, description="Idle time before scaling down.")

    @model_validator(mode="after")
    def _ordered(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})"
            )
        return self


class EngineDeploymentConfig(_Strict):
    """Replica placement of a GPU deployment."""

    num_replicas: int = Field(
        1, ge=1, le=1024, description="Fixed replica count (leave out when `autoscaling` is set)."
    )
    autoscaling: Optional[AutoscalingConfig] = Field(
        None, description="Autoscale between min and max replicas instead of a fixed count."
    )
    num_gpus: float = Field(0.0, ge=0, le=8, description="GPUs per replica (1 for one pipeline per GPU).")
    num_cpus: float = Field(1.0, ge=0, le=64, description="CPUs per replica.")
    max_queued_requests: int = Field(
        64,
        ge=-1,
        le=100_000,
        description=(
            "Requests (images) allowed to wait at each caller for a free replica slot; beyond it the "
            "caller gets 503 with Retry-After at once. -1: unbounded."
        ),
    )
    graceful_shutdown_timeout_s: float = Field(
        60.0,
        ge=0,
        le=3600,
        description=(
            "When a replica is stopped (scale-in, redeploy), how long it may finish the requests it holds "
            "(new ones go to other replicas) before it is killed; jobs it still held are retried."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _replicas_xor_autoscaling(cls, data: dict) -> dict:
        if isinstance(data, dict) and data.get("autoscaling") and "num_replicas" in data:
            raise ValueError("give either num_replicas or autoscaling, not both")
        return data

    @model_serializer(mode="wrap")
    def _dump_without_unused_replicas(self, dump: SerializerFunctionWrapHandler) -> dict:
        """An autoscaled deployment's dump leaves `num_replicas` out, so that it validates again
        (the ingress and the job manager get the resolved args as a dump)."""
        data = dump(self)
        if self.autoscaling is not None:
            data.pop("num_replicas", None)
        return data


#: The playground's path: one or more plain segments (no trailing slash), off the API's own paths.
PLAYGROUND_PATH_PATTERN = r"(/(?!\.+(/|$))[A-Za-z0-9._~-]+)+"
RESERVED_PATHS = ("v1", "docs", "redoc", "openapi.json", "healthz", "metrics", "static-offline-docs")


class IngressConfig(_Strict):
    num_replicas: int = Field(1, ge=1, le=1024, description="HTTP ingress replicas (CPU only).")
    num_cpus: float = Field(0.5, ge=0, le=64, description="CPUs per ingress replica.")
    max_ongoing_requests: int = Field(
        256,
        ge=1,
        le=100_000,
        description=(
            "Concurrent HTTP requests one ingress replica holds; they mostly wait on the engine, so "
            "this must stay well above the engine's max_batch_size or batches cannot fill."
        ),
    )
    max_queued_requests: int = Field(
        256,
        ge=-1,
        le=100_000,
        description=(
            "HTTP requests allowed to wait at each proxy for a free ingress slot; beyond it the proxy "
            "answers 503 with Retry-After at once. -1: unbounded."
        ),
    )
    engine_timeout_s: float = Field(
        600.0, gt=0, le=86400, description="Most time a synchronous request may take end to end (504 after)."
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        max_length=100,
        description=(
            "Origins browsers may call the API from (e.g. https://studio.example.com; `*` for any); empty: no CORS "
            "headers, so browsers on other origins cannot read answers."
        ),
    )
    log_prompts: bool = Field(
        False, description="Put each request's (first) prompt in its access-log line; off: prompts are never logged."
    )
    public_base_url: Optional[str] = Field(
        None,
        pattern=r"^https?://[^\s/]+(/[^\s]*)?$",
        description="Base of `url` responses (e.g. https://images.example.com); default: the request's own host.",
    )
    playground: Union[Literal[False], None, str] = Field(
        "/playground",
        description=(
            "Path of the browser playground (static files shipped in the package; `GET /` redirects there), "
            "open without an API key: the page holds no data, its API calls carry the key typed into it. "
            "`null` or `false`: not served."
        ),
    )

    @field_validator("playground")
    @classmethod
    def _playground_path(cls, path: Union[Literal[False], None, str]) -> Optional[str]:
        if not path:
            return None
        if not re.fullmatch(PLAYGROUND_PATH_PATTERN, path):
            raise ValueError(f"{path!r} must be a path such as /playground: segments of letters, digits, '.', '_', '-', '~'")
        first = path.split("/")[1]
        if first in RESERVED_PATHS:
            raise ValueError(f"{path!r} would shadow the API's /{first}; choose another path")
        return path


class LimitsConfig(_Strict):
    """Bounds on what one request may ask for; violations answer 400 naming the field."""

    max_pixels: int = Field(
        2048 * 2048, ge=64 * 64, le=8192 * 8192, description="Largest width × height accepted."
    )
    min_side: int = Field(64, ge=8, le=8192, description="Smallest width or height accepted.")
    max_steps: int = Field(150, ge=1, le=1000, description="Most denoising steps accepted.")
    max_n: int = Field(10, ge=1, le=128, description="Most images one request may ask for (`n`).")
    max_prompt_chars: int = Field(4000, ge=1, le=100_000, description="Longest prompt or negative prompt.")
    max_upload_bytes: int = Field(
        20 * 1024 * 1024, ge=1024, le=1024**3, description="Largest uploaded image or mask, in bytes (413 beyond)."
    )
    max_loras: int = Field(4, ge=0, le=16, description="Most LoRAs one request may blend.")
    max_input_pixels: int = Field(
        4096 * 4096,
        ge=64 * 64,
        le=16384 * 16384,
        description=(
            "Most pixels an uploaded image or mask may have, read from its header before decoding "
            "(413 beyond): a small file can declare a huge picture."
        ),
    )


#: What LoRAs for SDXL commonly train (diffusers' and kohya's scripts): the UNet's attention
#: projections, feed-forwards and transformer in/out projections; both text encoders' attention and
#: MLPs. Not the ResNet convolutions (LoCon), whose slots cost 9× per rank: add them when served.
DEFAULT_LORA_TARGETS = (
    r"unet\..*\.(to_q|to_k|to_v|to_out\.0|ff\.net\.0\.proj|ff\.net\.2|proj_in|proj_out)",
    r"text_encoder(_2)?\..*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)",
)


class LorasConfig(_Strict):
    """The LoRA registry and each engine replica's adapter cache."""

    dir: Optional[str] = Field(
        None, description="Folder of uploaded LoRA files (`.safetensors`); default `<state_dir>/loras`."
    )
    examples: Optional[bool] = Field(
        None,
        description="Also list the example LoRAs shipped with the tiny model (read-only). Default: when serving it.",
    )
    cache_size: int = Field(
        8,
        ge=1,
        le=256,
        description=(
            "LoRA sets (a request's LoRAs and weights) each engine replica keeps resident, least recently "
            "used evicted; at least batching.max_batch_size, so every running row has its set."
        ),
    )
    max_rank: int = Field(
        64, ge=1, le=1024, description="Largest rank a LoRA (or a request's blend, ranks added) may have; slots are this wide."
    )
    routing: Literal["multiplexed", "any"] = Field(
        "multiplexed",
        description=(
            "`multiplexed`: a request with LoRAs goes preferably to an engine replica that holds its set "
            "(Ray Serve's `multiplexed_model_id`). `any`: no hint, Ray's default routing (to compare)."
        ),
    )
    max_upload_bytes: int = Field(
        1024**3, ge=1024, le=16 * 1024**3, description="Largest LoRA file `POST /v1/loras` accepts (413 beyond)."
    )
    targets: list[str] = Field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        min_length=1,
        description=(
            "Layers (regular expressions matched in full against `component.module`) given LoRA slots at "
            "replica start. A compiled UNet's graph includes exactly these: a LoRA on another UNet layer is "
            "refused (400 `lora_layer_not_served`). Uncompiled, other layers get slots when a LoRA first needs them."
        ),
    )

    @field_validator("targets")
    @classmethod
    def _patterns_compile(cls, targets: list[str]) -> list[str]:
        for pattern in targets:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"target {pattern!r} is not a regular expression: {error}") from None
        return targets


#: Names of ControlNets and of their deployments (variants): safe in URLs, deployment names and logs.
CONTROLNET_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class ControlNetVariantConfig(_Strict):
    """One ControlNet deployment: the base model's weights plus the ControlNets it hosts (a request
    may combine only ControlNets hosted together), with its own replicas and resources."""

    models: dict[str, ControlNetSpec] = Field(
        ..., min_length=1, description="The ControlNets this deployment hosts, by the name requests give."
    )
    engine: EngineDeploymentConfig = Field(
        default_factory=EngineDeploymentConfig,
        description="Replicas and resources; fractional `num_gpus` lets a small variant share a GPU with the base.",
    )

    @field_validator("models")
    @classmethod
    def _names(cls, models: dict) -> dict:
        for name in models:
            if not re.fullmatch(CONTROLNET_NAME_PATTERN, name):
                raise ValueError(f"ControlNet name {name!r} must match {CONTROLNET_NAME_PATTERN}")
        return models


class RefinerConfig(_Strict):
    """The refiner deployment: its weights (on the base model's device and dtype) and its own
    replicas and resources, scaled apart from the base's."""

    model: RefinerSpec = Field(default_factory=TinyRefinerSpec, description="The refiner's weights.")
    engine: EngineDeploymentConfig = Field(
        default_factory=EngineDeploymentConfig,
        description="Replicas and resources; a refined image spends ~20% of its steps here (ensemble at 0.8).",
    )


def controlnet_role(variant: str) -> str:
    """The role (registry key) of a ControlNet variant's engine deployment."""
    return f"controlnet:{variant}"


def controlnet_deployment_name(variant: str) -> str:
    """The Ray Serve deployment name of a ControlNet variant."""
    return f"SDXLControlNet-{variant}"


_HOST_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")


class JobsConfig(_Strict):
    """Async jobs, stored results and files (the job manager deployment, one replica)."""

    db_path: Optional[str] = Field(
        None, description="SQLite file of job records; default `<state_dir>/jobs/jobs.sqlite3`."
    )
    results_dir: Optional[str] = Field(
        None, description="Folder of result and file bytes; default `<state_dir>/jobs/results`."
    )
    num_cpus: float = Field(0.5, ge=0, le=64, description="CPUs reserved for the job manager replica.")
    max_queued: int = Field(1000, ge=1, le=1_000_000, description="Queued jobs beyond which submits get 429.")
    max_running: int = Field(
        16, ge=1, le=1024, description="Jobs dispatched to the engines at once (their images batch together)."
    )
    max_attempts: int = Field(
        2, ge=1, le=10, description="Tries per job when an engine replica dies or fails; then the job fails."
    )
    run_timeout_s: float = Field(3600.0, gt=0, le=7 * 86400, description="Most time one attempt may run.")
    result_ttl_s: float = Field(86400.0, gt=0, le=365 * 86400, description="How long job results are kept.")
    file_ttl_s: float = Field(3600.0, gt=0, le=365 * 86400, description="How long `url` images stay downloadable.")
    cleanup_interval_s: float = Field(60.0, gt=0, le=86400, description="How often expired results are deleted.")
    max_batch_items: int = Field(64, ge=1, le=10_000, description="Most requests in one `/v1/images/batch`.")
    webhook_attempts: int = Field(5, ge=1, le=20, description="Tries per webhook delivery (exponential backoff).")
    webhook_backoff_s: float = Field(1.0, gt=0, le=600, description="First retry delay; doubles each retry.")
    webhook_timeout_s: float = Field(
        10.0, gt=0, le=300, description="Most time one webhook try takes (lookup, connect, send, the answer's status)."
    )
    webhook_allow: list[str] = Field(
        default_factory=list,
        max_length=1000,
        description=(
            "Webhook destinations allowed although internal (loopback, private, link-local, ... are refused "
            "otherwise): host names (exact, case-insensitive; not resolved nor checked) or IP addresses/CIDRs "
            "(e.g. `10.1.2.0/24`: an internal address inside one is allowed)."
        ),
    )
    webhook_secret: Optional[str] = Field(
        None,
        min_length=1,
        repr=False,
        description=(
            "Key signing every webhook (`X-Webhook-Signature`, HMAC-SHA256); the environment variable "
            "`SDXL_WEBHOOK_SECRET` wins over it. Unset: webhooks go unsigned."
        ),
    )

    @field_validator("webhook_allow")
    @classmethod
    def _allow_entries(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                if not _HOST_NAME.fullmatch(entry):
                    raise ValueError(f"{entry!r} is neither a host name nor an IP address or CIDR") from None
        return entries


class TrainingConfig(_Strict):
    """LoRA fine-tuning (`POST /v1/loras/train`) on the base engine's replicas, while they are idle."""

    enabled: bool = Field(True, description="Accept training jobs (false: `POST /v1/loras/train` answers 404).")
    hours: Optional[str] = Field(
        None,
        pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]-([01][0-9]|2[0-3]):[0-5][0-9]$",
        description=(
            "Train only inside these hours of the replica's local time, e.g. `22:00-06:00` (wrapping midnight); "
            "default any time. Either way a training step runs only when the engine has no request to serve."
        ),
    )
    idle_s: float = Field(
        1.0,
        ge=0,
        le=3600,
        description=(
            "Seconds the engine must have had no request before a training step runs: a burst's gaps do not "
            "start training, so a request rarely waits for a step in progress."
        ),
    )
    dir: Optional[str] = Field(None, description="Folder of training checkpoints; default `<state_dir>/training`.")
    checkpoint_every: int = Field(
        50, ge=1, le=100_000, description="Steps between checkpoints (a restarted replica resumes from the last)."
    )
    max_steps: int = Field(5000, ge=1, le=100_000, description="Most steps one job may ask for.")
    max_images: int = Field(200, ge=1, le=1000, description="Most examples one job may upload.")
    max_upload_bytes: int = Field(
        512 * 1024**2, ge=1024, le=16 * 1024**3, description="Largest `POST /v1/loras/train` body (413 beyond)."
    )


#: What an API key may do. `generate`: the image endpoints (sync); `jobs`: async jobs and
#: batches; `loras`: upload and delete LoRAs; `training`: LoRA training jobs; `admin`: all of
#: them, and every tenant's jobs and LoRAs.
Scope = Literal["generate", "jobs", "loras", "training", "admin"]
API_KEY_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class ApiKeyConfig(_Strict):
    """One API key: who it is (its name: logged, and the owner of what it makes), how to check it
    (the secret itself is never in the config), what it may do and how much."""

    name: str = Field(..., pattern=API_KEY_NAME_PATTERN, description="The key's name: the tenant its jobs and LoRAs belong to.")
    key_env: Optional[str] = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Environment variable holding the key (read at start)."
    )
    key_sha256: Optional[str] = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="The key's SHA-256 in hex (`printf %s KEY | sha256sum`)."
    )
    scopes: list[Scope] = Field(
        default_factory=lambda: ["generate", "jobs", "loras", "training"], min_length=1, description="What it may do."
    )
    requests_per_minute: Optional[int] = Field(None, ge=1, le=1_000_000, description="Most requests a minute (429 beyond).")
    images_per_minute: Optional[int] = Field(None, ge=1, le=1_000_000, description="Most images a minute, jobs included (429 beyond).")
    concurrent_jobs: Optional[int] = Field(None, ge=1, le=100_000, description="Most unfinished jobs at once (429 beyond).")

    @model_validator(mode="after")
    def _one_secret_source(self) -> "ApiKeyConfig":
        if (self.key_env is None) == (self.key_sha256 is None):
            raise ValueError(f"auth key {self.name!r} needs exactly one of key_env and key_sha256")
        return self


class AuthConfig(_Strict):
    """API keys (`Authorization: Bearer <key>`, as the OpenAI client sends it). Off by default:
    the local default serves anyone who reaches the port."""

    enabled: bool = Field(False, description="Require an API key on every endpoint but /healthz and the docs.")
    keys: list[ApiKeyConfig] = Field(default_factory=list, description="The keys; names unique.")

    @model_validator(mode="after")
    def _keys_when_enabled(self) -> "AuthConfig":
        if self.enabled and not self.keys:
            raise ValueError("auth.enabled needs at least one key in auth.keys")
        names = [key.name for key in self.keys]
        if len(set(names)) != len(names):
            raise ValueError(f"auth.keys names must be unique: {names}")
        return self


class AppArgs(_Strict):
    """Everything `build_app` needs; the defaults serve the tiny model on CPU."""

    model: ModelSpec = Field(default_factory=TinySpec, description="Weights of the base deployment.")
    batching: BatchingConfig = Field(default_factory=BatchingConfig, description="Dynamic batching.")
    engine: EngineDeploymentConfig = Field(
        default_factory=EngineDeploymentConfig, description="Replicas and resources of the GPU deployment."
    )
    ingress: IngressConfig = Field(default_factory=IngressConfig, description="The HTTP ingress deployment.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Per-request bounds.")
    jobs: JobsConfig = Field(default_factory=JobsConfig, description="Async jobs and stored results.")
    loras: LorasConfig = Field(default_factory=LorasConfig, description="LoRA registry and adapter cache.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="LoRA fine-tuning jobs.")
    auth: AuthConfig = Field(default_factory=AuthConfig, description="API keys, tenants and quotas.")
    controlnets: Optional[dict[str, ControlNetVariantConfig]] = Field(
        None,
        description=(
            "ControlNet deployments by variant name, each with the ControlNets it hosts. Default: the "
            "tiny family's canny and silhouette ControlNets, one deployment each, when serving the tiny "
            "model; none otherwise; `{}`: none."
        ),
    )
    refiner: Union[RefinerConfig, Literal[False], None] = Field(
        None,
        description=(
            "The refiner deployment requests may ask for (`refiner` in a request). Default: the tiny "
            "family's refiner when serving the tiny model, none otherwise; `false`: none."
        ),
    )
    state_dir: Optional[str] = Field(
        None,
        description=(
            "Folder of the service's state: job records and results (`jobs/`), compile caches "
            "(`compile/`), created private (0700, files 0600). Default `$SDXL_SERVE_CACHE`, else "
            "`~/.cache/sdxl-serve`. Give each deployment its own."
        ),
    )

    def with_state_paths(self) -> "AppArgs":
        """These args with every state path that was left out placed under `state_dir` (the one
        place they are resolved; the builder passes the result to the deployments)."""
        root = state_root(self.state_dir)
        jobs = self.jobs.model_copy(
            update={
                "db_path": self.jobs.db_path or str(root / "jobs" / "jobs.sqlite3"),
                "results_dir": self.jobs.results_dir or str(root / "jobs" / "results"),
            }
        )
        optimize = self.model.optimize
        cache = optimize.compile_cache_dir or str(root / "compile")
        model = self.model.model_copy(update={"optimize": optimize.model_copy(update={"compile_cache_dir": cache})})
        loras = self.loras.model_copy(
            update={
                "dir": self.loras.dir or str(root / "loras"),
                "examples": self.model.source == "tiny" if self.loras.examples is None else self.loras.examples,
            }
        )
        training = self.training.model_copy(update={"dir": self.training.dir or str(root / "training")})
        controlnets = self.controlnets
        if controlnets is None:
            tiny = {name: ControlNetVariantConfig(models={name: TinyControlNetSpec(map=name)}) for name in ("canny", "silhouette")}
            controlnets = tiny if self.model.source == "tiny" else {}
        refiner = self.refiner
        if refiner is None:
            refiner = RefinerConfig() if self.model.source == "tiny" else False
        return self.model_copy(
            update={
                "jobs": jobs, "model": model, "loras": loras, "training": training, "controlnets": controlnets,
                "refiner": refiner,
            }
        )

    def trains_loras(self) -> bool:
        """Whether the app accepts LoRA training jobs (the base engine then trains when idle):
        `training.enabled`, and LoRAs served to use them (`limits.max_loras` > 0)."""
        return self.training.enabled and self.limits.max_loras > 0

    def controlnet_roles(self) -> dict[str, str]:
        """Each served ControlNet's name → the role of the deployment hosting it (resolved args)."""
        return {name: controlnet_role(variant) for variant, config in (self.controlnets or {}).items() for name in config.models}

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> "AppArgs":
        width, height = self.model.default_size
        if width * height > self.limits.max_pixels:
            raise ValueError(
                f"model.default_size {width}x{height} exceeds limits.max_pixels ({self.limits.max_pixels})"
            )
        if self.loras.cache_size < self.batching.max_batch_size:
            raise ValueError(
                f"loras.cache_size ({self.loras.cache_size}) must be at least batching.max_batch_size "
                f"({self.batching.max_batch_size}): every running row may need its own LoRA set"
            )
        hosts: dict[str, str] = {}
        for variant, config in (self.controlnets or {}).items():
            if not re.fullmatch(CONTROLNET_NAME_PATTERN, variant):
                raise ValueError(f"controlnets variant {variant!r} must match {CONTROLNET_NAME_PATTERN}")
            for name, spec in config.models.items():
                if name in hosts:
                    raise ValueError(f"ControlNet {name!r} is hosted by both {hosts[name]!r} and {variant!r}; name it once")
                hosts[name] = variant
                if spec.source in ("tiny", "sdxl-arch") and spec.source != self.model.source:
                    raise ValueError(
                        f"controlnets.{variant}.models.{name} is a {spec.source!r} ControlNet but the model is "
                        f"{self.model.source!r}: a ControlNet must match its base model's architecture"
                    )
        if self.refiner and self.refiner.model.source in ("tiny", "sdxl-arch") and self.refiner.model.source != self.model.source:
            raise ValueError(
                f"refiner.model is a {self.refiner.model.source!r} refiner but the model is {self.model.source!r}: "
                "the refiner must match its base model's architecture"
            )
        if self.model.default_steps > self.limits.max_steps:
            raise ValueError(
                f"model.default_steps ({self.model.default_steps}) exceeds limits.max_steps ({self.limits.max_steps})"
            )
        return self
