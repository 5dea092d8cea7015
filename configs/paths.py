"""Where the service keeps files on disk, and how they are created (pure stdlib, importable anywhere).

State (job records, results, stored files, compile caches) lives under one folder: `state_dir`
in the app config, else `$SDXL_SERVE_CACHE`, else `~/.cache/sdxl-serve`. Folders are created
0700 and files 0600: results are users' images, and nothing there is meant for other local users.
"""

import os
from pathlib import Path
from typing import Optional

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def default_cache_dir() -> Path:
    """`$SDXL_SERVE_CACHE`, else `~/.cache/sdxl-serve`."""
    return Path(os.environ.get("SDXL_SERVE_CACHE", Path.home() / ".cache" / "sdxl-serve"))


def state_root(state_dir: Optional[str]) -> Path:
    return Path(state_dir) if state_dir else default_cache_dir()


def private_dir(path: Path) -> Path:
    """Create `path` (and missing parents) readable by its owner only; tighten it if it exists."""
    path = Path(path)
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    path.chmod(PRIVATE_DIR_MODE)
    return path


def write_private(path: Path, data: bytes) -> None:
    """Write `path` atomically (a temporary file renamed over it), mode 0600."""
    staging = Path(path).with_name(Path(path).name + ".tmp")
    descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
    os.replace(staging, path)


def touch_private(path: Path) -> None:
    """Create an empty file 0600 if it is missing (SQLite then creates its journal files with the
    database file's mode); tighten it if it exists."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, PRIVATE_FILE_MODE))
    os.chmod(path, PRIVATE_FILE_MODE)
