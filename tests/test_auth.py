"""Tests for server.auth: key hashing, scopes, the key store and header parsing."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from server import auth
from server.auth import (
    ANONYMOUS,
    ApiKey,
    Forbidden,
    KeyStore,
    Unauthorized,
    generate_key,
    hash_key,
    key_id_of,
    secret_from_headers,
    verify_key,
)

FAST = 1_000  # iterations for tests that do not depend on the default cost


def test_hash_format() -> None:
    encoded = hash_key("s3cret")
    algorithm, iterations, salt, digest = encoded.split("$")
    assert algorithm == "pbkdf2_sha256"
    assert int(iterations) == auth.DEFAULT_ITERATIONS
    assert len(bytes.fromhex(salt)) == auth.SALT_BYTES
    assert len(bytes.fromhex(digest)) == 32
    assert "s3cret" not in encoded


def test_salt_differs_per_hash() -> None:
    first, second = hash_key("same", FAST), hash_key("same", FAST)
    assert first != second
    assert first.split("$")[2] != second.split("$")[2]
    assert verify_key("same", first) and verify_key("same", second)


def test_verify_true_and_false() -> None:
    auth.clear_verify_cache()
    encoded = hash_key("right", FAST)
    assert verify_key("right", encoded)
    assert verify_key("right", encoded)  # cached path
    assert not verify_key("wrong", encoded)
    assert not verify_key("", encoded)
    # A cached success for one stored hash says nothing about another key's hash.
    assert not verify_key("right", hash_key("other", FAST))
    for malformed in ["", "plain", "md5$1$00$00", "pbkdf2_sha256$x$00$00", "pbkdf2_sha256$1$zz$00"]:
        assert not verify_key("right", malformed)


def test_verify_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    auth.clear_verify_cache()
    monkeypatch.setattr(auth, "VERIFY_CACHE_SIZE", 4)
    for i in range(10):
        assert verify_key(f"k{i}", hash_key(f"k{i}", 1))
    assert len(auth._verified) == 4


def test_generate_key_shape() -> None:
    secret, key_id = generate_key()
    assert secret.startswith(f"vf_{key_id}_")
    assert key_id_of(secret) == key_id
    assert len(secret) > 40
    assert generate_key()[0] != secret
    assert key_id_of("not-a-key") is None
    assert key_id_of("vf_UPPER_x") is None
    assert key_id_of("vf_abc_") is None


def test_api_key_validation() -> None:
    with pytest.raises(ValueError, match="scope"):
        ApiKey(id="abc", scope="root", hash="")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="id"):
        ApiKey(id="has_underscore", scope="speak", hash="")
    with pytest.raises(ValueError, match="invalid API keys"):
        KeyStore([ApiKey(id="abc", scope="speak", hash="not-a-hash")])
    good = ApiKey(id="abc", scope="speak", hash=hash_key("x", FAST))
    with pytest.raises(ValueError, match="duplicate"):
        KeyStore([good, good])


def test_scope_rules() -> None:
    store = KeyStore()
    speak_secret, speak_key = store.add("speak", "app")
    admin_secret, admin_key = store.add("admin", "ops")
    assert store.enabled and len(store) == 2
    assert store.authenticate(speak_secret, "speak") == speak_key
    with pytest.raises(Forbidden, match=speak_key.id):
        store.authenticate(speak_secret, "admin")
    assert store.authenticate(admin_secret, "speak") == admin_key
    assert store.authenticate(admin_secret, "admin") == admin_key
    with pytest.raises(ValueError):
        store.authenticate(admin_secret, "root")  # type: ignore[arg-type]


def test_unauthorized_cases() -> None:
    store = KeyStore()
    secret, key = store.add("admin")
    forged = f"vf_{key.id}_{'A' * 43}"
    for bad in [None, "", "garbage", "vf_ffffffff_whatever", forged, secret + "x"]:
        with pytest.raises(Unauthorized) as info:
            store.authenticate(bad, "speak")
        if bad:
            assert bad not in str(info.value)  # never echo the secret
    assert isinstance(Unauthorized("x"), auth.AuthError)
    assert isinstance(Forbidden("x"), auth.AuthError)
    store.remove(key.id)
    assert not store.enabled
    with pytest.raises(KeyError):
        store.remove(key.id)


def test_disabled_store_allows_everything() -> None:
    store = KeyStore()
    assert not store.enabled
    assert store.authenticate(None, "admin") is ANONYMOUS
    assert store.authenticate("anything", "speak") is ANONYMOUS


def test_secret_from_headers() -> None:
    assert secret_from_headers({"Authorization": "Bearer vf_a_b"}) == "vf_a_b"
    assert secret_from_headers({"authorization": "bearer   vf_a_b  "}) == "vf_a_b"
    assert secret_from_headers({"X-API-Key": " vf_c_d "}) == "vf_c_d"
    assert secret_from_headers({"x-api-key": "k", "AUTHORIZATION": "Bearer t"}) == "t"
    assert secret_from_headers({"Authorization": "Basic dXNlcjpwdw==", "X-Api-Key": "k"}) == "k"
    assert secret_from_headers({"Authorization": "Bearer "}) is None
    assert secret_from_headers({"Authorization": "Basic abc"}) is None
    assert secret_from_headers({"X-API-Key": ""}) is None
    assert secret_from_headers({}) is None


def test_save_load_round_trip_never_writes_secret(tmp_path: Path) -> None:
    store = KeyStore()
    secrets_ = [store.add("speak", "app")[0], store.add("admin", "ops")[0]]
    path = tmp_path / "conf" / "keys.json"
    store.save(path)
    text = path.read_text()
    for secret in secrets_:
        assert secret not in text
        assert secret.split("_", 2)[2] not in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["keys.json"]  # no temp file left
    data = json.loads(text)
    assert sorted(data["keys"][0]) == ["hash", "id", "label", "scope"]

    loaded = KeyStore.load(path)
    assert loaded.keys == store.keys
    auth.clear_verify_cache()  # make the check below run PBKDF2 against the loaded hash
    assert loaded.authenticate(secrets_[0], "speak").label == "app"
    with pytest.raises(Forbidden):
        loaded.authenticate(secrets_[0], "admin")
    assert loaded.authenticate(secrets_[1], "admin").label == "ops"


def test_load_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    with pytest.raises(FileNotFoundError):
        KeyStore.load(missing)
    assert not KeyStore.load(missing, missing_ok=True).enabled
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        KeyStore.load(bad)
    bad.write_text(json.dumps({"keys": [{"id": "a", "scope": "god", "hash": "x"}, 3]}))
    with pytest.raises(ValueError) as info:
        KeyStore.load(bad)
    assert "keys[0]" in str(info.value) and "keys[1]" in str(info.value)  # all problems at once
