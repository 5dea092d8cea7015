"""`optimize.cuda_graphs`: small UNet calls replayed from captured graphs.

No GPU here, so the capture is the seam: `replaying_capture` keeps a graph's contract (a replay
reads the tensors the capture read and writes the outputs it returned, in place) by running the
call again, so an engine that forgot to copy its inputs in, or to copy the outputs out before the
next replay, gives wrong images here as it would on a GPU."""

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch.utils import _pytree as pytree

from configs.model_spec import TINY_LORA_DIR, OptimizeConfig, TinySpec
from deployments.engine.control import RunOutput
from deployments.engine.cuda_graphs import GraphedCalls, cuda_capture
from deployments.engine.deep_cache import DeepCacheUNet
from deployments.engine.factory import EngineFactory
from deployments.engine.lora import AdapterCache
from deployments.engine.loop import StepEngine
from deployments.lora_registry import LoraRegistry
from deployments.pipelines import load_pipeline
from deployments.types import GenerationRequest, LoraRef

SPEC = TinySpec(device="cpu")
SMALL = dict(width=64, height=64, num_inference_steps=6, guidance_scale=5.0, scheduler="euler")


def replaying_capture(run):
    outputs = run()

    def replay():
        for out, new in zip(pytree.tree_leaves(outputs), pytree.tree_leaves(run())):
            if out is not None:
                out.copy_(new)

    return replay, outputs


def _request(**fields) -> GenerationRequest:
    return GenerationRequest(**{"prompt": "a red circle on a blue background", **SMALL, **fields}).with_defaults(SPEC)


def _images(engine: StepEngine, requests: list[GenerationRequest]) -> list[np.ndarray]:
    outcomes = engine.generate(requests)
    assert all(isinstance(outcome, RunOutput) for outcome in outcomes), outcomes
    return [outcome.image for outcome in outcomes]


def test_a_shape_runs_once_as_it_is_then_captures_then_replays_with_the_new_inputs():
    calls = GraphedCalls(max_rows=2, capture=replaying_capture)

    def double(x, extra):
        return x * 2 + extra["b"], None

    for value in (1.0, 2.0, 3.0, 4.0):
        out, none = calls.run(double, torch.full((2, 3), value), {"b": torch.ones(2, 3)})
        assert none is None and torch.equal(out, torch.full((2, 3), 2 * value + 1))
    # eager, capture (which runs it once here, not on a GPU), then replays of the captured call
    assert calls.counts == {"captures": 1, "replays": 3, "capture_failures": 0}
    held, _ = calls.run(double, torch.full((2, 3), 5.0), {"b": torch.ones(2, 3)})
    calls.run(double, torch.full((2, 3), 6.0), {"b": torch.ones(2, 3)})
    assert torch.equal(held, torch.full((2, 3), 11.0))  # copied out: the next replay left it alone
    # another shape is another graph
    calls.run(double, torch.ones(1, 3), {"b": torch.ones(1, 3)})
    calls.run(double, torch.ones(1, 3), {"b": torch.ones(1, 3)})
    assert calls.counts["captures"] == 2
    assert calls.takes(2) and not calls.takes(3)


def test_a_call_that_cannot_be_captured_runs_as_it_is_and_is_not_tried_again():
    tries = []

    def refusing(run):
        tries.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    calls = GraphedCalls(max_rows=2, capture=refusing)
    for value in (1.0, 2.0, 3.0):
        (out,) = calls.run(lambda x: (x + 1,), torch.full((2,), value))
        assert torch.equal(out, torch.full((2,), value + 1))
    assert len(tries) == 1 and calls.counts == {"captures": 0, "replays": 0, "capture_failures": 1}


@pytest.fixture(scope="module")
def plain(tiny_pipe):
    return StepEngine(tiny_pipe, max_rows=8, buckets=[1, 8], deep_cache=DeepCacheUNet(tiny_pipe.unet))


@pytest.fixture(scope="module")
def graphed(tiny_pipe):
    graphs = GraphedCalls(max_rows=2, capture=replaying_capture)
    return StepEngine(tiny_pipe, max_rows=8, buckets=[1, 8], deep_cache=DeepCacheUNet(tiny_pipe.unet), graphs=graphs)


def test_a_lone_request_replays_its_calls_and_draws_the_same_image(plain, graphed):
    for request in (_request(seed=3), _request(seed=4, deep_cache_interval=2, prompt="a green square")):
        before = dict(graphed.graphs.counts)
        (image,) = _images(graphed, [request])
        (expected,) = _images(plain, [request])
        assert np.array_equal(image, expected), request.prompt
        assert graphed.graphs.counts["replays"] > before["replays"]
    # the full pass and the shallow pass at 2 UNet rows: a graph each
    assert graphed.graphs.counts["captures"] == 2


def test_calls_above_the_smallest_bucket_run_as_they_are(plain, graphed):
    requests = [_request(seed=seed) for seed in range(5, 13)]
    before = dict(graphed.graphs.counts)
    assert all(np.array_equal(a, b) for a, b in zip(_images(graphed, requests), _images(plain, requests)))
    assert graphed.graphs.counts == before  # eight images are one 16-row call a step, never graphed


def test_calls_with_a_lora_slot_run_as_they_are(tmp_path):
    pipe = load_pipeline(SPEC)  # its own: LoRA slot layers get wrapped
    adapters = AdapterCache(pipe, LoraRegistry(tmp_path, builtin=(TINY_LORA_DIR,)), size=2, max_rank=64)
    graphs = GraphedCalls(max_rows=2, capture=replaying_capture)
    engine = StepEngine(pipe, max_rows=8, buckets=[1, 8], adapters=adapters, graphs=graphs)
    styled = _request(seed=9, loras=(LoraRef(name="pastel", weight=0.8),))
    plain = _request(seed=9)
    for _ in range(3):
        styled_image, = _images(engine, [styled])
    assert graphs.counts["replays"] == 0  # a slot's rows read the slot's weights, which a graph would freeze
    for _ in range(2):
        plain_image, = _images(engine, [plain])
    assert graphs.counts["replays"] > 0
    assert np.abs(styled_image - plain_image).max() > 0.05  # the LoRA applied, not a replayed base call


def test_the_switch_needs_compiled_buckets_and_not_reduce_overhead():
    with pytest.raises(ValidationError, match="cuda_graphs needs compile"):
        OptimizeConfig(cuda_graphs=True)
    with pytest.raises(ValidationError, match="reduce-overhead"):
        OptimizeConfig(cuda_graphs=True, compile="unet", compile_mode="reduce-overhead")
    assert OptimizeConfig(cuda_graphs=True, compile="unet", batch_buckets=[1, 8]).cuda_graphs


def test_a_cpu_deployment_with_cuda_graphs_fails_at_load_naming_the_device(tiny_pipe):
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        cuda_capture(torch.device("cpu"))
    spec = TinySpec(device="cpu", optimize={"compile": "unet", "compile_backend": "eager", "cuda_graphs": True})
    factory = EngineFactory(model_spec=spec.model_dump(), batching={}, pipeline_factory=lambda _: tiny_pipe)
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        factory()


def test_a_controlnet_variants_engine_has_no_graphs(tiny_pipe):
    """Its calls are all steered (a graph would freeze the residuals), so it captures none,
    holds no graph memory, and needs no CUDA device for the switch."""
    spec = TinySpec(device="cpu", optimize={"compile": "unet", "compile_backend": "eager", "cuda_graphs": True})
    factory = EngineFactory(
        model_spec=spec.model_dump(), batching={}, pipeline_factory=lambda _: tiny_pipe,
        controlnets={"canny": {"source": "tiny", "map": "canny"}},
    )
    assert factory().graphs is None
