"""Building a served engine from a model spec: load the pipeline (the injected pipeline factory,
`load_pipeline` by default), wrap it in a `StepEngine`, compile every batch bucket before serving.

`EngineFactory` is plain data plus a callable, so the app builder binds it into a deployment and
the replica calls it in its constructor. torch and diffusers are imported when it is called, not
when this module is: the builder imports it to bind the graph and stays light.
"""

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from pydantic import TypeAdapter

from configs.app_args import BatchingConfig, LorasConfig, TrainingConfig
from configs.model_spec import ControlNetSpec, ModelSpec, RefinerSpec
from deployments.lora_registry import lora_registry
from deployments.types import GenerationRequest


@dataclass(frozen=True)
class EngineFactory:
    """`factory(observer)` → a warmed-up `StepEngine` with a `startup` report."""

    model_spec: dict[str, Any]
    batching: dict[str, Any]
    #: Most requests that may wait inside the engine (beyond it `submit` answers 503).
    max_waiting: Optional[int] = None
    #: A resolved `LorasConfig` (`AppArgs.with_state_paths`); None: the engine serves no LoRAs.
    loras: Optional[dict[str, Any]] = None
    #: The ControlNets this engine hosts: name → `ControlNetSpec` as a dict (a ControlNet variant's
    #: deployment); None: the base engine.
    controlnets: Optional[dict[str, dict[str, Any]]] = None
    #: A `RefinerSpec` as a dict: this engine is the refiner (its pipeline from `load_refiner`,
    #: on the base spec's device and dtype; no LoRAs, no ControlNets); None: a base engine.
    refiner: Optional[dict[str, Any]] = None
    #: spec → `StableDiffusionXLPipeline`; None: `deployments.pipelines.load_pipeline` (or
    #: `load_refiner` for a refiner).
    pipeline_factory: Optional[Callable[[Any], Any]] = None
    #: A resolved, enabled `TrainingConfig` (the base engine, with `loras`): the engine trains
    #: LoRAs when idle, each run on a pipeline of its own from `pipeline_factory`; None: it does not.
    training: Optional[dict[str, Any]] = None

    def __call__(self, observer: Any = None) -> Any:
        from deployments.engine.cuda_graphs import GraphedCalls, cuda_capture
        from deployments.engine.lora import AdapterCache
        from deployments.engine.loop import StepEngine
        from deployments.optimize import compile_cache_counts, deep_cache_unet
        from deployments.pipelines import load_controlnet, load_pipeline, load_refiner

        spec = TypeAdapter(ModelSpec).validate_python(self.model_spec)
        batching = BatchingConfig.model_validate(self.batching)
        started = time.perf_counter()
        if self.refiner is not None:
            refiner = TypeAdapter(RefinerSpec).validate_python(self.refiner)
            pipeline = (self.pipeline_factory or (lambda base: load_refiner(refiner, base)))(spec)
        else:
            pipeline = (self.pipeline_factory or load_pipeline)(spec)
        controlnets = {
            name: load_controlnet(TypeAdapter(ControlNetSpec).validate_python(net), pipeline.device, pipeline.unet.dtype)
            for name, net in (self.controlnets or {}).items()
        }
        # Deep-cache requests are plain base requests (no ControlNet, no refiner stage).
        serves_deep_cache = spec.optimize.deep_cache and self.refiner is None and not controlnets
        deep_cache = deep_cache_unet(pipeline.unet, spec.optimize) if serves_deep_cache else None
        # Graphs for the smallest bucket's calls (a lone guided image is two UNet rows; the
        # unguided bucket's one-row calls are smaller still). The refiner runs eager, unbucketed;
        # a ControlNet variant's calls are all steered, which no graph holds.
        graphs = None
        if spec.optimize.cuda_graphs and self.refiner is None and not controlnets:
            graphs = GraphedCalls(max_rows=2 * spec.optimize.buckets()[0], capture=cuda_capture(pipeline.device))
        load_s = time.perf_counter() - started
        adapters = None
        if self.loras is not None:
            loras = LorasConfig.model_validate(self.loras)
            adapters = AdapterCache(
                pipeline,
                lora_registry(loras),
                size=loras.cache_size,
                max_rank=loras.max_rank,
                targets=tuple(loras.targets),
                # A compiled UNet keeps its modules: new slot layers there would recompile it.
                frozen=("unet",) if spec.optimize.compile != "off" else (),
                observer=observer,
            )
        engine = StepEngine(
            pipeline,
            max_rows=batching.max_batch_size,
            scheduling=batching.scheduling,
            batch_wait_s=batching.batch_wait_timeout_s,
            max_waiting=self.max_waiting,
            # The speed switches are the base's: the refiner runs eager, at any batch size.
            buckets=None if self.refiner is not None else spec.optimize.buckets(),
            unguided_bucket=self.refiner is None and spec.optimize.unguided_bucket,
            adapters=adapters,
            controlnets=controlnets,
            deep_cache=deep_cache,
            graphs=graphs,
            refiner=self.refiner is not None,
            vae_tiling_above=spec.optimize.vae_tiling_above_pixels,
            observer=observer,
            background=self._training_queue(spec),
        )
        compile_cache = profile = None
        if spec.optimize.compile != "off" and self.refiner is None:
            # Compile every bucket now (or load it from the compile cache), not on user requests;
            # two steps compile the same graphs as thirty. Every step whole, whatever the
            # deployment's default interval: the warm-up adds the shallow pass itself.
            before = compile_cache_counts()
            warmup = GenerationRequest(
                prompt="warm-up", seed=0, num_inference_steps=2, deep_cache_interval=1
            ).with_defaults(spec)
            engine.warmup(warmup, spec.optimize.warmup_sizes)
            compile_cache = {name: count - before[name] for name, count in compile_cache_counts().items()}
            profile = engine.profile_buckets(warmup) if spec.optimize.profile_warmup else None
        engine.startup = {
            "load_s": round(load_s, 3),
            "warmup_s": round(time.perf_counter() - started - load_s, 3),
            "compile_cache": compile_cache,
        }
        if profile is not None:
            engine.startup["profile"] = profile
        return engine

    def _training_queue(self, spec: Any) -> Any:
        if self.training is None:
            return None
        from pathlib import Path

        from configs.model_spec import OptimizeConfig
        from deployments.engine.lora_trainer import LoraTrainer
        from deployments.engine.training_queue import TrainingQueue
        from deployments.pipelines import load_pipeline

        training = TrainingConfig.model_validate(self.training)
        if training.dir is None or self.loras is None:
            raise ValueError("training needs a resolved training.dir and loras (AppArgs.with_state_paths)")
        # The trainer's pipeline: the served weights without the speed switches (no compiled
        # graph, fused projection or LoRA slot layer to train through).
        plain = spec.model_copy(update={"optimize": OptimizeConfig()})
        load = self.pipeline_factory or load_pipeline
        return TrainingQueue(
            lambda settings, examples, folder: LoraTrainer(lambda: load(plain), settings, examples, folder),
            lora_registry(LorasConfig.model_validate(self.loras)),
            Path(training.dir),
            checkpoint_every=training.checkpoint_every,
            hours=training.hours,
            idle_s=training.idle_s,
        )
