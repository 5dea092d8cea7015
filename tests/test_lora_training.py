"""LoRA fine-tuning on the tiny model, no Ray: the trainer (resume, the file it writes), the
training queue (cancel, discard, hours, failures) and the engine running training only while it
has no request to serve."""

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from configs.model_spec import TinySpec
from deployments.engine.lora import AdapterCache
from deployments.engine.lora_trainer import LoraTrainer
from deployments.engine.loop import StepEngine
from deployments.engine.training_queue import TrainingControl, TrainingQueue, in_hours
from deployments.lora_registry import LoraRegistry, describe
from deployments.pipelines import load_pipeline
from deployments.training import LoraTrainingSettings, TrainingExample, TrainingProgress, TrainingResult
from deployments.types import EngineError, GenerationRequest, LoraRef, OverloadedError, RequestCancelledError
from training import shapes


def _examples(count: int = 4, side: int = 64) -> list[TrainingExample]:
    scene = shapes.sample_scenes(count, torch.Generator().manual_seed(0))
    images = shapes.render(scene, side, pastel=True)
    return [
        TrainingExample((images[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), shapes.caption(scene, i))
        for i in range(count)
    ]


def _settings(**fields) -> LoraTrainingSettings:
    return LoraTrainingSettings(**{"name": "trained", "rank": 4, "steps": 6, "learning_rate": 1e-3, "batch_size": 2, "seed": 3, **fields}).with_defaults(64)


def _load():
    return load_pipeline(TinySpec(device="cpu"))


def _trainer(folder: Path, **fields) -> LoraTrainer:
    return LoraTrainer(_load, _settings(**fields), _examples(), folder)


def test_a_resumed_run_ends_with_the_weights_of_one_that_never_stopped(tmp_path):
    whole = _trainer(tmp_path / "whole")
    while not whole.done:
        whole.step()
    whole.export(tmp_path / "whole.safetensors")

    first = _trainer(tmp_path / "cut")
    for _ in range(3):
        first.step()
    first.checkpoint()
    first.step()  # a step after the checkpoint is lost with the process
    resumed = _trainer(tmp_path / "cut")
    assert resumed.resumed_from == 3
    while not resumed.done:
        resumed.step()
    resumed.export(tmp_path / "resumed.safetensors")
    expected, got = load_file(tmp_path / "whole.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[key], got[key]) for key in expected)
    assert any(key.endswith("lora_B.weight") and got[key].abs().max() > 0 for key in got)  # it trained


def test_a_checkpoint_of_other_settings_is_not_resumed(tmp_path):
    first = _trainer(tmp_path)
    first.step()
    first.checkpoint()
    assert _trainer(tmp_path, learning_rate=2e-3).resumed_from == 0


def test_the_exported_file_is_a_lora_the_registry_describes_and_diffusers_loads(tmp_path, tiny_pipe):
    trainer = _trainer(tmp_path, train_text_encoder=True, steps=1)
    trainer.step()
    trainer.export(tmp_path / "style.safetensors")
    info = describe(tmp_path / "style.safetensors", "style", builtin=False)
    assert info.format == "diffusers" and info.rank == 4
    assert info.components == ("text_encoder", "text_encoder_2", "unet")
    pipe = _load()
    pipe.load_lora_weights(tmp_path, weight_name="style.safetensors")
    assert set(pipe.get_active_adapters()) and pipe.unet.peft_config


def test_examples_of_the_wrong_size_are_refused_quoting_them():
    with pytest.raises(ValueError, match=r"example 0 is uint8 \(64, 64, 3\), not uint8 \(128, 128, 3\)"):
        LoraTrainer(_load, _settings().model_copy(update={"resolution": 128}), _examples())


# -- the queue ------------------------------------------------------------------------------------


def _queue(tmp_path, **options) -> TrainingQueue:
    registry = LoraRegistry(tmp_path / "loras")
    return TrainingQueue(lambda s, e, folder: LoraTrainer(_load, s, e, folder), registry, tmp_path / "training", **options)


def _drain(queue: TrainingQueue, limit: int = 100) -> None:
    for _ in range(limit):
        if not queue.pending():
            return
        queue.run_step()
    raise AssertionError("the queue did not finish")


def test_a_run_publishes_its_lora_and_answers_its_bytes(tmp_path):
    queue = _queue(tmp_path, checkpoint_every=2)
    events: list[TrainingProgress] = []
    control = TrainingControl(on_progress=events.append)
    queue.submit("job-1", _settings(), _examples(), control)
    with pytest.raises(OverloadedError):  # one run a replica
        queue.submit("job-2", _settings(name="other"), _examples(), TrainingControl())
    _drain(queue)
    result = control.outcome
    assert isinstance(result, TrainingResult) and result.name == "trained" and result.steps == 6
    assert queue.registry.path("trained").read_bytes() == result.data
    assert [event.step for event in events] == [1, 2, 3, 4, 5, 6] and events[-1].eta_s == 0.0
    assert not (tmp_path / "training" / "job-1").exists()  # checkpoints go with success


def test_a_cancelled_run_ends_at_its_next_step_and_keeps_its_checkpoint_until_discarded(tmp_path):
    queue = _queue(tmp_path, checkpoint_every=2)
    control = TrainingControl()
    queue.submit("job-1", _settings(), _examples(), control)
    for _ in range(3):  # build, then two steps (a checkpoint at 2)
        queue.run_step()
    control.cancel()
    queue.run_step()
    assert isinstance(control.outcome, RequestCancelledError) and not queue.pending()
    assert (tmp_path / "training" / "job-1" / "state.json").is_file()
    queue.discard("job-1")
    assert not (tmp_path / "training" / "job-1").exists()


def test_a_run_submitted_again_resumes_from_its_checkpoint(tmp_path):
    queue = _queue(tmp_path, checkpoint_every=2)
    first = TrainingControl()
    queue.submit("job-1", _settings(), _examples(), first)
    for _ in range(4):  # build, three steps: the checkpoint holds step 2
        queue.run_step()
    first.cancel()
    queue.run_step()
    again = TrainingControl()
    queue.submit("job-1", _settings(), _examples(), again)
    _drain(queue)
    assert again.outcome.resumed_from == 2 and again.outcome.steps == 6


def test_a_failing_run_fails_its_job_only_and_frees_the_queue(tmp_path):
    def broken(settings, examples, folder):
        raise RuntimeError("no memory")

    queue = TrainingQueue(broken, LoraRegistry(tmp_path / "loras"), tmp_path / "training")
    control = TrainingControl()
    queue.submit("job-1", _settings(), _examples(), control)
    queue.run_step()
    assert isinstance(control.outcome, EngineError) and "no memory" in control.outcome.message
    assert not queue.pending() and queue.stats()["failed"] == 1


def test_outside_its_hours_a_run_waits(tmp_path):
    clock = [time.struct_time((2026, 12, 2, 12, 0, 0, 2, 336, 0))]
    queue = _queue(tmp_path, hours="22:00-06:00", clock=lambda: clock[0])
    queue.submit("job-1", _settings(), _examples(), TrainingControl())
    assert not queue.pending()
    clock[0] = time.struct_time((2026, 12, 2, 23, 30, 0, 2, 336, 0))
    assert queue.pending()


@pytest.mark.parametrize(
    "hours, hour, minute, inside",
    [("22:00-06:00", 23, 0, True), ("22:00-06:00", 5, 59, True), ("22:00-06:00", 6, 0, False), ("09:00-17:30", 17, 29, True),
     ("09:00-17:30", 8, 59, False), (None, 3, 0, True)],
)
def test_hours_may_wrap_midnight(hours, hour, minute, inside):
    assert in_hours(hours, time.struct_time((2026, 1, 1, hour, minute, 0, 3, 1, 0))) is inside


# -- the engine: training only while idle ------------------------------------------------------------


def test_a_request_arriving_during_training_is_served_and_the_run_pauses_then_finishes(tmp_path):
    queue = _queue(tmp_path)
    registry = queue.registry
    pipe = _load()  # its own: the adapter cache gives a pipeline's layers LoRA slots
    engine = StepEngine(pipe, max_rows=4, adapters=AdapterCache(pipe, registry, size=4, max_rank=16), background=queue)
    events: list[TrainingProgress] = []
    control = TrainingControl(on_progress=events.append)
    queue.submit("job-1", _settings(steps=40), _examples(), control)
    stop = threading.Event()
    loop = threading.Thread(target=engine.run, args=(stop,))
    loop.start()
    try:
        deadline = time.time() + 60
        while not any(event.step >= 2 for event in events) and time.time() < deadline:
            time.sleep(0.01)
        request = GenerationRequest(prompt="a red circle", seed=1, num_inference_steps=4).with_defaults(TinySpec(device="cpu"))
        served = engine.submit(request).wait(timeout=60)
        assert served is not None and served.image.shape == (128, 128, 3)
        result = control.wait(timeout=120)
    finally:
        stop.set()
        loop.join()
    assert isinstance(result, TrainingResult) and result.steps == 40
    assert any(event.paused for event in events) and queue.stats()["pauses"] >= 1
    # The run's LoRA is served at once, by name, through the same registry.
    styled = GenerationRequest(prompt="a red circle", seed=1, num_inference_steps=4, loras=[LoraRef(name="trained")])
    (outcome,) = engine.generate([styled.with_defaults(TinySpec(device="cpu"))])
    assert np.abs(outcome.image - served.image).max() > 0


def test_training_waits_for_the_engine_to_have_been_idle_for_idle_s(tmp_path, tiny_pipe):
    queue = TrainingQueue(lambda s, e, folder: LoraTrainer(_load, s, e, folder), LoraRegistry(tmp_path / "loras"), tmp_path / "training", idle_s=2.0)
    engine = StepEngine(tiny_pipe, max_rows=4, background=queue)
    stop = threading.Event()
    loop = threading.Thread(target=engine.run, args=(stop,))
    loop.start()
    try:
        request = GenerationRequest(prompt="a red circle", seed=1, num_inference_steps=2).with_defaults(TinySpec(device="cpu"))
        assert engine.submit(request).wait(timeout=60) is not None
        control = TrainingControl()
        queue.submit("job-1", _settings(steps=2), _examples(), control)
        time.sleep(0.5)
        assert queue.stats()["steps"] == 0  # within 2 s of the request's last step
        assert isinstance(control.wait(timeout=60), TrainingResult)
    finally:
        stop.set()
        loop.join()
