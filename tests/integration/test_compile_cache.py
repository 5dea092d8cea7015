"""A compiled replica that restarts loads its kernels from the persistent compile cache instead of
compiling again (inductor on CPU, the tiny model, its transformer blocks compiled): what
`optimize.compile_cache_dir` is for."""

import numpy as np
import pytest
from ray import serve

from deployments.engine.factory import EngineFactory
from deployments.replica import EngineDeployment
from deployments.types import GenerationRequest

pytestmark = pytest.mark.integration


def _deploy(cache_dir) -> serve.handle.DeploymentHandle:
    spec = {
        "source": "tiny",
        "device": "cpu",
        "default_size": [64, 64],  # the warm-up runs the default size once per bucket
        # Regional: the transformer blocks' graphs go through the same inductor and AOTAutograd
        # caches as the whole UNet's, for a third of the cold compile (2-core CPU: 37 s cold and
        # 8 s warm, where the whole UNet took 98 s and 14 s).
        "optimize": {"compile": "unet", "compile_scope": "regional", "batch_buckets": [1], "compile_cache_dir": str(cache_dir)},
    }
    # No CPUs reserved: the session's app holds the test cluster's two.
    factory = EngineFactory(spec, {"max_batch_size": 1})
    engine = EngineDeployment.options(name="Compiled", ray_actor_options={"num_cpus": 0}).bind(spec, {}, factory)
    return serve.run(engine, name="compiled", route_prefix=None)


def test_a_restarted_compiled_replica_starts_warm_and_draws_the_same(served, engine, tmp_path):
    request = GenerationRequest(prompt="a red circle", seed=5, width=64, height=64, num_inference_steps=2)
    try:
        cold = _deploy(tmp_path).model_info.remote().result()["compile_cache"]
        serve.delete("compiled")
        restarted = _deploy(tmp_path)
        info = restarted.model_info.remote().result()
        warm = info["compile_cache"]
        compiled_image = restarted.generate.remote(request).result().image
    finally:
        serve.delete("compiled", _blocking=False)  # the restarted replica drains while the test goes on
    assert any(tmp_path.iterdir())  # the cache went where the spec said
    assert cold["fxgraph_cache_miss"] >= 1 and cold["fxgraph_cache_hit"] == 0
    assert warm["fxgraph_cache_miss"] == 0 and warm["fxgraph_cache_hit"] >= 1
    assert list(info["unet_call_s"]) == [2] and info["unet_call_s"][2] > 0  # timed at warm-up
    assert list(info["decode_call_s"]) == [1] and info["decode_call_s"][1] > 0
    eager_image = engine.generate.remote(request).result().image
    assert np.abs(compiled_image.astype(int) - eager_image.astype(int)).max() <= 2
