"""Encryption at rest and the blind index.

Numbers, bodies and payloads are stored as MultiFernet tokens (`security.keys`, newest first),
so a key can be rotated in without a flag day: new writes use the newest key, old rows stay
readable, and `txsms rotate-keys` re-encrypts them.

Look-ups by phone number go through a keyed HMAC ("blind index"). It must not change when the
Fernet keys rotate, so it has its own key, `security.index_key`, which never rotates (the
configuration requires it beside `security.keys`). Development mode generates both.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from txsms.core import jsoncodec
from txsms.core.config import SecurityConfig
from txsms.core.errors import TxsmsError

log = logging.getLogger(__name__)

DEV_KEY_FILE = "development.key"
DEV_INDEX_FILE = "development.index-key"


class DecryptionError(TxsmsError):
    """A stored value was encrypted with a key that is no longer configured."""


class Vault:
    def __init__(self, keys: list[str] | tuple[str, ...], index_key: str):
        if not keys:
            raise ValueError("at least one Fernet key is needed")
        if not index_key:
            raise ValueError("an index key is needed")
        self._fernet = MultiFernet([Fernet(k) for k in keys])
        self._index_key = hashlib.sha256(b"txsms-index:" + index_key.encode()).digest()

    @classmethod
    def from_config(cls, security: SecurityConfig, data_dir: str | os.PathLike) -> Vault:
        if security.keys:
            return cls(list(security.keys), security.index_key or "")
        return cls([development_key(data_dir)], development_key(data_dir, DEV_INDEX_FILE))

    def encrypt(self, value: str | None) -> bytes | None:
        if value is None:
            return None
        return self._fernet.encrypt(value.encode())

    def decrypt(self, token: bytes | None) -> str | None:
        if token is None:
            return None
        try:
            return self._fernet.decrypt(bytes(token)).decode()
        except InvalidToken as exc:
            raise DecryptionError(
                "stored value cannot be decrypted with the configured keys"
            ) from exc

    def encrypt_json(self, value: Any) -> bytes | None:
        return None if value is None else self.encrypt(json.dumps(value, separators=(",", ":")))

    def decrypt_json(self, token: bytes | None) -> Any:
        text = self.decrypt(token)
        return None if text is None else jsoncodec.loads(text)

    def rotate(self, token: bytes) -> bytes:
        return self._fernet.rotate(bytes(token))

    def index(self, e164: str) -> str:
        """The blind index of a normalised (E.164) number: stable, keyed, not reversible."""
        return hmac.new(self._index_key, e164.encode(), hashlib.sha256).hexdigest()


def development_key(data_dir: str | os.PathLike, name: str = DEV_KEY_FILE) -> str:
    """Read or create a development key, and say so: it is no substitute for real keys."""
    path = Path(data_dir) / name
    if path.exists():
        key = path.read_text().strip()
        if name == DEV_KEY_FILE:
            log.warning(
                "using the development key in %s (set security.keys and "
                "security.index_key for production)",
                path,
            )
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Fernet.generate_key().decode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    if name == DEV_KEY_FILE:
        log.warning(
            "no security.keys configured: generated a development key in %s "
            "(not for production: run 'txsms keygen' and set security.keys and index_key)",
            path,
        )
    return key
