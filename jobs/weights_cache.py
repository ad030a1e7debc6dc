"""The sha256 of a local checkpoint's weight files, kept between runs.

Every run records its model's identity, and hashing a checkpoint reads every
byte of it. The cache file (XDG_CACHE_HOME, else ~/.cache: bulkgen/weights-sha256.json)
maps the weight files' (realpath, size, mtime_ns, inode) to their digest, so a
checkpoint whose files changed in any way that can be seen without reading them
gets a new key and is hashed again; the old key is dropped then. A cache that cannot be read or
written costs a rehash, never a run.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

CACHE_ENV = "XDG_CACHE_HOME"


def cache_file() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "bulkgen" / "weights-sha256.json"


def file_key(path: Path) -> str:
    """What identifies one version of a file without reading it."""
    st = os.stat(path)
    return f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def weights_sha256(files: list[Path]) -> str:
    """The sha256 of `files` (each one's name, then its bytes, in the order given: the
    digest the job record has always held), from the cache while every file's key
    is the same as when it was computed."""
    key = "\n".join(file_key(path) for path in files)
    cached = _read()
    if key not in cached:
        # Entries of files changed or gone since are dropped, so nightly runs over a checkpoint
        # rewritten each day keep one entry, not one a day.
        cached = {k: v for k, v in cached.items() if _still_current(k)}
        cached[key] = _sha256(files)
        _write(cached)
    return cached[key]


def _still_current(key: str) -> bool:
    """Whether every file of a cache key is still there, in the version the key names."""
    try:
        return all(file_key(Path(line.rsplit("|", 3)[0])) == line for line in key.split("\n"))
    except OSError:
        return False


def _sha256(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):  # hashlib releases the GIL on large updates
                digest.update(chunk)
    return digest.hexdigest()


def _read() -> dict[str, str]:
    try:
        doc = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in doc.items() if isinstance(v, str)} if isinstance(doc, dict) else {}


def _write(cached: dict[str, str]) -> None:
    """Replace the cache file whole (a reader never sees half of it); a failure is ignored."""
    target = cache_file()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=target.parent, delete=False, suffix=".tmp") as f:
            json.dump(cached, f)
        os.replace(f.name, target)
    except OSError:
        pass
