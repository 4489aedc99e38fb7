"""Secrets Bastion keeps in files of its own (HMAC keys for sessions, audit, forms): read, or
created once with a random value and mode 0600."""

from __future__ import annotations

import secrets
from pathlib import Path


def load_or_create_secret(path: Path) -> bytes:
    """Read the session key, or create a random one (mode 0600) the first time."""
    if path.exists():
        return path.read_bytes().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32).encode()
    path.touch(mode=0o600)
    path.write_bytes(key)
    return key
