"""API keys: stored only as salted PBKDF2 hashes, two scopes (``admin`` implies ``speak``).

A secret looks like ``vf_<id>_<random>``; the id is public and picks the one stored key to check.
Every key that is not (yet) verified costs one PBKDF2 run of the stored keys' cost, an unknown or
malformed one included (checked against a dummy hash), so answer times do not tell which ids
exist. Successful verifications are cached (keyed by the secret's SHA-256), so a client sending
the same key on every request pays the PBKDF2 price once.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import json
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from finetune.fsutil import atomic_write_bytes

import msgspec

from server.limits import NO_LIMITS, KeyLimits

Scope = Literal["speak", "admin"]
SCOPES: frozenset[str] = frozenset(get_args(Scope))

ALGORITHM = "pbkdf2_sha256"
DEFAULT_ITERATIONS = 100_000
SALT_BYTES = 16
KEY_PREFIX = "vf"
VERIFY_CACHE_SIZE = 1024

_ID_RE = re.compile(r"[a-z0-9]{1,32}")
_HEX_RE = re.compile(r"(?:[0-9a-f]{2})+")


class AuthError(Exception):
    """Base class of authentication / authorisation failures."""


class Unauthorized(AuthError):
    """No key, or a key that is not valid (HTTP 401)."""


class Forbidden(AuthError):
    """A valid key without the scope the operation needs (HTTP 403)."""


def scope_allows(have: Scope, needed: Scope) -> bool:
    return have == "admin" or have == needed


@dataclass(frozen=True)
class ApiKey:
    id: str
    scope: Scope
    hash: str
    label: str = ""
    limits: KeyLimits = NO_LIMITS  # server/limits.py; none set: unlimited

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or _ID_RE.fullmatch(self.id) is None:
            raise ValueError(f"API key id {self.id!r} must be 1-32 lower-case letters or digits")
        if self.scope not in SCOPES:
            raise ValueError(f"API key {self.id!r}: scope {self.scope!r} not in {sorted(SCOPES)}")
        if not isinstance(self.label, str):
            raise ValueError(f"API key {self.id!r}: label must be a string")
        if not isinstance(self.hash, str):
            raise ValueError(f"API key {self.id!r}: hash must be a string")

    def allows(self, needed: Scope) -> bool:
        return scope_allows(self.scope, needed)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "scope": self.scope,
            "hash": self.hash,
            "label": self.label,
        }
        if not self.limits.is_empty():
            data["limits"] = msgspec.to_builtins(self.limits)
        return data


# What `KeyStore.authenticate` returns when no key is configured (auth switched off).
ANONYMOUS = ApiKey(id="anonymous", scope="admin", hash="", label="auth disabled")


def _parse_hash(encoded: str) -> tuple[int, bytes, bytes]:
    """Split ``pbkdf2_sha256$iterations$salt_hex$digest_hex``; ValueError if malformed."""
    parts = encoded.split("$") if isinstance(encoded, str) else []
    if (
        len(parts) != 4
        or parts[0] != ALGORITHM
        or not parts[1].isdigit()
        or int(parts[1]) < 1
        or _HEX_RE.fullmatch(parts[2]) is None
        or _HEX_RE.fullmatch(parts[3]) is None
    ):
        raise ValueError(f"not a {ALGORITHM}$iterations$salt_hex$digest_hex hash")
    return int(parts[1]), bytes.fromhex(parts[2]), bytes.fromhex(parts[3])


def hash_key(secret: str, iterations: int = DEFAULT_ITERATIONS) -> str:
    """Salted PBKDF2-HMAC-SHA256 of `secret`, as ``pbkdf2_sha256$iterations$salt$digest``."""
    salt = secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha256", secret.encode("utf-8"), salt, iterations)
    return f"{ALGORITHM}${iterations}${salt.hex()}${digest.hex()}"


_verified: OrderedDict[tuple[bytes, str], None] = OrderedDict()
_verified_lock = threading.Lock()


def verify_key(secret: str, encoded: str) -> bool:
    """True when `secret` matches the stored hash `encoded` (False if `encoded` is malformed)."""
    try:
        iterations, salt, expected = _parse_hash(encoded)
    except ValueError:
        return False
    raw = secret.encode("utf-8")
    # Keyed by the stored hash too: a secret verified against one key says nothing about another.
    cache_key = (hashlib.sha256(raw).digest(), encoded)
    with _verified_lock:
        if cache_key in _verified:
            _verified.move_to_end(cache_key)
            return True
    digest = hashlib.pbkdf2_hmac("sha256", raw, salt, iterations)
    if not hmac.compare_digest(digest, expected):
        return False
    with _verified_lock:
        _verified[cache_key] = None
        while len(_verified) > VERIFY_CACHE_SIZE:
            _verified.popitem(last=False)
    return True


@functools.cache
def _dummy_hash(iterations: int = DEFAULT_ITERATIONS) -> str:
    """A valid hash of `iterations` that no secret matches (a random secret, thrown away)."""
    return hash_key(secrets.token_urlsafe(32), iterations)


def clear_verify_cache() -> None:
    with _verified_lock:
        _verified.clear()


def generate_key() -> tuple[str, str]:
    """A new secret ``vf_<id>_<random>`` and its public id."""
    key_id = secrets.token_hex(4)
    return f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}", key_id


def key_id_of(secret: str) -> str | None:
    """The public id inside a ``vf_<id>_<random>`` secret, or None if it has another shape."""
    parts = secret.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[2]:
        return None
    return parts[1] if _ID_RE.fullmatch(parts[1]) else None


def secret_from_headers(headers: Mapping[str, str]) -> str | None:
    """The key from ``Authorization: Bearer <key>``, else from ``X-API-Key``; None if absent.

    Header names are matched case-insensitively, so a plain dict works as well as Litestar's
    ``Headers``. An Authorization header with another scheme (Basic, ...) is ignored.
    """
    found: dict[str, str] = {}
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in ("authorization", "x-api-key") and lowered not in found:
            found[lowered] = value
    scheme, _, token = found.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    api_key = found.get("x-api-key", "").strip()
    return api_key or None


class KeyStore:
    """The configured API keys. No keys: auth is disabled and every request is allowed."""

    def __init__(self, keys: Iterable[ApiKey] = ()) -> None:
        self._keys: dict[str, ApiKey] = {}
        self._lock = threading.Lock()
        problems: list[str] = []
        for key in keys:
            if key.id in self._keys:
                problems.append(f"duplicate key id {key.id!r}")
                continue
            try:
                _parse_hash(key.hash)
            except ValueError as exc:
                problems.append(f"key {key.id!r}: {exc}")
                continue
            self._keys[key.id] = key
        if problems:
            raise ValueError("invalid API keys: " + "; ".join(problems))
        # An unknown id is checked against a dummy hash as costly as the stored keys' hashes.
        costs = [_parse_hash(key.hash)[0] for key in self._keys.values()]
        self._dummy_iterations = max(costs, default=DEFAULT_ITERATIONS)
        if self._keys:
            _dummy_hash(self._dummy_iterations)  # made now, not inside the first check

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    @property
    def keys(self) -> tuple[ApiKey, ...]:
        with self._lock:
            return tuple(self._keys.values())

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, key_id: str) -> ApiKey | None:
        return self._keys.get(key_id)

    def add(self, scope: Scope, label: str = "") -> tuple[str, ApiKey]:
        """Create a key; return its secret (shown once, never stored) and the stored record."""
        with self._lock:
            while True:
                secret, key_id = generate_key()
                if key_id not in self._keys:
                    break
            key = ApiKey(id=key_id, scope=scope, hash=hash_key(secret), label=label)
            self._keys[key_id] = key
            self._dummy_iterations = max(self._dummy_iterations, DEFAULT_ITERATIONS)
            _dummy_hash(self._dummy_iterations)
        return secret, key

    def remove(self, key_id: str) -> ApiKey:
        with self._lock:
            try:
                return self._keys.pop(key_id)
            except KeyError:
                raise KeyError(f"no API key with id {key_id!r}") from None

    def rotate(self, key_id: str) -> tuple[str, ApiKey]:
        """A new secret for `key_id` (same id, scope, label and limits: its usage goes on);
        the old secret stops working once the store is saved and reloaded."""
        with self._lock:
            secret = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
            key = dataclasses.replace(self._require(key_id), hash=hash_key(secret))
            self._keys[key_id] = key
        return secret, key

    def set_limits(self, key_id: str, limits: KeyLimits) -> ApiKey:
        with self._lock:
            key = dataclasses.replace(self._require(key_id), limits=limits)
            self._keys[key_id] = key
        return key

    def _require(self, key_id: str) -> ApiKey:
        key = self._keys.get(key_id)
        if key is None:
            raise KeyError(f"no API key with id {key_id!r}")
        return key

    def authenticate(self, secret: str | None, needed: Scope) -> ApiKey:
        """The key that `secret` belongs to, if it grants `needed`.

        Raises `Unauthorized` (missing, unknown or wrong key) or `Forbidden` (valid key, scope too
        narrow). With auth disabled it returns `ANONYMOUS`.
        """
        if needed not in SCOPES:
            raise ValueError(f"unknown scope {needed!r}")
        if not self.enabled:
            return ANONYMOUS
        if not secret:
            raise Unauthorized("missing API key")
        key_id = key_id_of(secret)
        key = self._keys.get(key_id) if key_id is not None else None
        # An unknown id costs the same hashing as a wrong secret for a known one: the answer's
        # timing must not tell which key ids exist.
        encoded = key.hash if key is not None else _dummy_hash(self._dummy_iterations)
        valid = verify_key(secret, encoded)
        # The message never repeats the secret: it ends up in logs and problem+json bodies.
        if key is None or not valid:
            raise Unauthorized("invalid API key")
        if not key.allows(needed):
            raise Forbidden(f"API key {key.id!r} has scope {key.scope!r}; this needs {needed!r}")
        return key

    # ---- persistence --------------------------------------------------------------------------
    @classmethod
    def load_configured(cls, path: Path | str) -> KeyStore:
        """The key file a server was configured with: missing, unreadable, malformed or empty
        is an error (one line), never a server without auth."""
        if not str(path).strip():
            raise ValueError("api_keys_file is empty; leave it out (or null) to run without auth")
        path = Path(path)
        try:
            store = cls.load(path)
        except FileNotFoundError:
            raise ValueError(f"api_keys_file {path} does not exist") from None
        except OSError as exc:
            raise ValueError(f"api_keys_file {path} cannot be read ({exc.strerror})") from None
        if not store.enabled:
            raise ValueError(
                f"api_keys_file {path} holds no keys; add one (voicefoundry keys --file "
                f"{path}) or remove api_keys_file to run without auth"
            )
        return store

    @classmethod
    def load(cls, path: Path | str, *, missing_ok: bool = False) -> KeyStore:
        """Read ``{"keys": [{"id", "scope", "hash", "label"}, ...]}``; report every bad entry."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            if missing_ok:
                return cls()
            raise
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON ({exc})") from exc
        entries = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise ValueError(f'{path}: expected {{"keys": [...]}}')
        keys: list[ApiKey] = []
        problems: list[str] = []
        for index, entry in enumerate(entries):
            try:
                if not isinstance(entry, dict):
                    raise ValueError("not an object")
                unknown = sorted(set(entry) - {"id", "scope", "hash", "label", "limits"})
                if unknown:
                    raise ValueError(f"unknown field(s) {', '.join(unknown)}")
                try:
                    limits = msgspec.convert(entry.get("limits") or {}, KeyLimits)
                except msgspec.ValidationError as exc:
                    raise ValueError(f"limits: {exc}") from None
                keys.append(
                    ApiKey(
                        id=entry.get("id", ""),
                        scope=entry.get("scope", ""),
                        hash=entry.get("hash", ""),
                        label=entry.get("label", ""),
                        limits=limits,
                    )
                )
            except ValueError as exc:
                problems.append(f"keys[{index}]: {exc}")
        if problems:
            raise ValueError(f"{path}: " + "; ".join(problems))
        try:
            return cls(keys)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc

    def save(self, path: Path | str) -> None:
        """Write the hashes (never a secret) atomically: temp file in the same dir, then rename."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"keys": [key.to_dict() for key in self.keys]}, indent=2) + "\n"
        atomic_write_bytes(path, body.encode("utf-8"), mode=0o600)


class ChangingKeys:
    """`KeyStore`'s read side over keys that change while the server runs (a key file, the
    registry database): always enabled, and `current()` says what holds now; None while the
    keys are unusable, which refuses every key (fail closed, never auth off)."""

    @property
    def enabled(self) -> bool:
        return True

    @property
    def keys(self) -> tuple[ApiKey, ...]:
        store = self.current()
        return store.keys if store is not None else ()

    def get(self, key_id: str) -> ApiKey | None:
        store = self.current()
        return store.get(key_id) if store is not None else None

    def authenticate(self, secret: str | None, needed: Scope) -> ApiKey:
        store = self.current()
        if store is None:
            raise Unauthorized("invalid API key")
        return store.authenticate(secret, needed)

    def current(self) -> KeyStore | None:
        raise NotImplementedError
