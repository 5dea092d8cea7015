"""The app configuration the in-process and the cluster tests share."""

import socket

#: Most requests one engine replica denoises at once in the test apps.
MAX_BATCH = 8


def app_args_for(state_dir) -> dict:
    """The app configuration the in-process and the cluster tests share."""
    return {
        "model": {"source": "tiny", "name": "sdxl-tiny", "device": "cpu", "optimize": {"deep_cache": True}},
        "batching": {"max_batch_size": MAX_BATCH},
        "engine": {"num_replicas": 1, "num_cpus": 1},
        "ingress": {"num_replicas": 1, "num_cpus": 0.5, "engine_timeout_s": 120},
        "limits": {"max_n": 10},
        "state_dir": str(state_dir),
        # Webhook tests deliver to receivers on 127.0.0.1, refused unless allow-listed.
        "jobs": {"max_attempts": 2, "webhook_backoff_s": 0.1, "cleanup_interval_s": 1.0, "webhook_allow": ["127.0.0.1"]},
        # Checkpoints often enough that a replica killed a second into a run has one to resume.
        "training": {"checkpoint_every": 10},
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
