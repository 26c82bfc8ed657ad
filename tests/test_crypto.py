"""Encryption at rest (MultiFernet), key rotation, the blind index and the development key."""

from __future__ import annotations

import base64
import logging
import os
import stat

import pytest
from cryptography.fernet import Fernet

from txsms.core.config import SecurityConfig
from txsms.core.crypto import DEV_KEY_FILE, DecryptionError, Vault, development_key
from txsms.core.errors import TxsmsError

OLD = Fernet.generate_key().decode()
NEW = Fernet.generate_key().decode()
OTHER = Fernet.generate_key().decode()
INDEX_KEY = "a-dedicated-index-key-0123456789"
NUMBER = "+14155550100"
BODY = "Test Shop: your order #1001 has shipped. Tracking 1Z999AA10123456784."


def test_round_trip():
    vault = Vault([OLD], INDEX_KEY)
    for value in (NUMBER, BODY, "", "Ünïcode ✓ 你好"):
        assert vault.decrypt(vault.encrypt(value)) == value
    assert vault.encrypt(None) is None
    assert vault.decrypt(None) is None


def test_json_round_trip():
    vault = Vault([OLD], INDEX_KEY)
    value = {"phone": NUMBER, "items": [1, 2.5, None, True], "nested": {"a": "b"}}
    assert vault.decrypt_json(vault.encrypt_json(value)) == value
    assert vault.encrypt_json(None) is None
    assert vault.decrypt_json(None) is None


def test_decrypt_accepts_what_drivers_return_for_binary_columns():
    vault = Vault([OLD], INDEX_KEY)
    token = vault.encrypt(NUMBER)
    assert vault.decrypt(memoryview(token)) == NUMBER
    assert vault.decrypt(bytearray(token)) == NUMBER


def test_tokens_do_not_contain_the_plaintext():
    vault = Vault([OLD], INDEX_KEY)
    first, second = vault.encrypt(NUMBER), vault.encrypt(NUMBER)
    assert first != second  # a fresh IV each time: equal numbers are not equal tokens
    for token in (first, second, vault.encrypt_json({"phone": NUMBER})):
        raw = base64.urlsafe_b64decode(token)
        for form in (NUMBER.encode(), NUMBER[1:].encode(), b"4155550100"):
            assert form not in token
            assert form not in raw
    assert b"1Z999AA10123456784" not in vault.encrypt(BODY)


def test_a_foreign_key_raises_decryption_error():
    token = Vault([OLD], INDEX_KEY).encrypt(NUMBER)
    with pytest.raises(DecryptionError) as info:
        Vault([OTHER], INDEX_KEY).decrypt(token)
    assert isinstance(info.value, TxsmsError)
    assert NUMBER not in str(info.value)
    with pytest.raises(DecryptionError):
        Vault([OLD], INDEX_KEY).decrypt(b"not a fernet token")
    with pytest.raises(DecryptionError):
        Vault([OTHER], INDEX_KEY).decrypt_json(Vault([OLD], INDEX_KEY).encrypt_json({"a": 1}))


def test_a_vault_needs_a_key():
    with pytest.raises(ValueError):
        Vault([], INDEX_KEY)


def test_rotation_old_tokens_stay_readable_and_rotate_to_the_newest_key():
    old_token = Vault([OLD], INDEX_KEY).encrypt(NUMBER)
    during = Vault([NEW, OLD], INDEX_KEY)
    assert during.decrypt(old_token) == NUMBER  # readable while both keys are configured

    new_write = during.encrypt(BODY)  # new writes use the newest key ...
    assert Vault([NEW], INDEX_KEY).decrypt(new_write) == BODY
    with pytest.raises(DecryptionError):
        Vault([OLD], INDEX_KEY).decrypt(new_write)

    rotated = during.rotate(old_token)  # ... and rotate() moves old tokens onto it
    assert rotated != old_token
    assert Vault([NEW], INDEX_KEY).decrypt(rotated) == NUMBER
    with pytest.raises(DecryptionError):
        Vault([OLD], INDEX_KEY).decrypt(rotated)
    assert during.rotate(memoryview(old_token)) is not None  # as PostgreSQL drivers may return


def test_blind_index_is_deterministic_keyed_and_opaque():
    index = Vault([OLD], INDEX_KEY).index(NUMBER)
    assert index == Vault([OLD], INDEX_KEY).index(NUMBER)
    assert len(index) == 64 and int(index, 16) >= 0  # hex SHA-256
    assert "4155550100" not in index
    assert Vault([OLD], INDEX_KEY).index("+14155550101") != index
    assert Vault([OLD], INDEX_KEY + "x").index(NUMBER) != index  # keyed: another key, another


def test_blind_index_survives_a_rotation():
    before = Vault([OLD], INDEX_KEY).index(NUMBER)
    assert Vault([NEW, OLD], INDEX_KEY).index(NUMBER) == before
    assert Vault([NEW], INDEX_KEY).index(NUMBER) == before  # even after the old key is gone


def test_an_index_key_is_required():
    with pytest.raises(ValueError, match="index key"):
        Vault([OLD], "")


def test_development_key_is_created_once_with_mode_0600_and_reused(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="txsms.core.crypto")
    data_dir = tmp_path / "data"  # does not exist yet
    key = development_key(data_dir)
    path = data_dir / DEV_KEY_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    Fernet(key)  # a valid Fernet key
    assert path.read_text().strip() == key
    [created] = caplog.records
    assert created.levelno == logging.WARNING
    assert "development key" in created.getMessage()
    assert "production" in created.getMessage()
    assert key not in caplog.text  # the warning names the file, never the key

    caplog.clear()
    mtime = os.stat(path).st_mtime_ns
    assert development_key(data_dir) == key
    assert os.stat(path).st_mtime_ns == mtime  # read, not rewritten
    [reused] = caplog.records
    assert reused.levelno == logging.WARNING
    assert "development key" in reused.getMessage()
    assert key not in caplog.text


def test_vault_from_config_uses_the_development_key_only_without_keys(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="txsms.core.crypto")
    data_dir = tmp_path / "data"

    configured = Vault.from_config(SecurityConfig(keys=(OLD,), index_key=INDEX_KEY), data_dir)
    assert not (data_dir / DEV_KEY_FILE).exists()
    assert not caplog.records
    assert Vault([OLD], INDEX_KEY).decrypt(configured.encrypt(NUMBER)) == NUMBER

    first = Vault.from_config(SecurityConfig(), data_dir)
    second = Vault.from_config(SecurityConfig(), data_dir)  # e.g. after a restart
    assert second.decrypt(first.encrypt(NUMBER)) == NUMBER
    assert first.index(NUMBER) == second.index(NUMBER)
    dev_key = (data_dir / DEV_KEY_FILE).read_text().strip()
    assert Vault([dev_key], INDEX_KEY).decrypt(first.encrypt(NUMBER)) == NUMBER
    assert len(caplog.records) == 2
