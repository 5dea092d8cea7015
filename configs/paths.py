"""Where the service keeps files on disk by default (pure stdlib, importable from anywhere)."""

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """`$SDXL_SERVE_CACHE`, else `~/.cache/sdxl-serve`: job records, results and compile caches."""
    return Path(os.environ.get("SDXL_SERVE_CACHE", Path.home() / ".cache" / "sdxl-serve"))
