"""Per-session key/value caches with a bounded window.

mlx-audio's caches grow for as long as a conversation lasts, and its rotating cache breaks the
order its attention assumes. `WindowKVCache` keeps the keys in order, writes in place into a
preallocated buffer, and drops all but the newest `keep` entries when the buffer fills (an
occasional copy), so memory stays bounded. `offset` counts every position ever written, which is
what rotary embeddings and mlx-audio's Mimi attention mask need: the returned keys are always the
newest `n` positions, ending at `offset`.
"""

from __future__ import annotations

import mlx.core as mx


class WindowKVCache:
    def __init__(self, keep: int, slack: int = 64) -> None:
        self.keep = keep
        self.slack = slack
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.length = 0  # valid entries in the buffer
        self.offset = 0  # positions written so far

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        steps = keys.shape[2]
        if self.keys is None or self.values is None or self.length + steps > self.keys.shape[2]:
            self._reallocate(keys, values, steps)
        assert self.keys is not None and self.values is not None
        end = self.length + steps
        self.keys[..., self.length : end, :] = keys
        self.values[..., self.length : end, :] = values
        self.length = end
        self.offset += steps
        return self.keys[..., :end, :], self.values[..., :end, :]

    def _reallocate(self, keys: mx.array, values: mx.array, steps: int) -> None:
        kept = min(self.length, self.keep)
        capacity = kept + steps + self.slack
        batch, heads, _, k_dim = keys.shape
        new_keys = mx.zeros((batch, heads, capacity, k_dim), keys.dtype)
        new_values = mx.zeros((batch, heads, capacity, values.shape[3]), values.dtype)
        if self.keys is not None and self.values is not None and kept > 0:
            start = self.length - kept
            new_keys[..., :kept, :] = self.keys[..., start : self.length, :]
            new_values[..., :kept, :] = self.values[..., start : self.length, :]
        self.keys, self.values, self.length = new_keys, new_values, kept

    def arrays(self) -> list[mx.array]:
        return [a for a in (self.keys, self.values) if a is not None]

    def clear(self) -> None:
        self.keys = None
        self.values = None
        self.length = 0
