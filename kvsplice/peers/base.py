"""Peer methods (KIVI, H2O, StreamingLLM, transformers' QuantizedCache, plain per-token ints): the
contract and the registry by name.

A peer is a small config dataclass. `cache_factory(model)` returns a `() -> Cache` factory giving a
fresh cache per sequence batch; every cache it makes has a `memory()` method returning
`kvsplice.cache.CacheMemory` counted from the tensors it actually holds (codes, scales, zero points,
residual windows, kept positions, attention statistics), so the evaluation protocols of
kvsplice/evaluate/perplexity.py measure every peer the same way as our own caches.

    peer = get_peer("kivi", bits=2, group=32, residual=128)
    make = peer.cache_factory(model)
    row = perplexity_prefill_continue(model, ids, make, ...)

`teacher_forced_exact`: True when one teacher-forced forward gives exactly what token-by-token
decoding would (per-token codecs without windows); False for eviction, residual windows and
token-grouped quantisers (a group's scale would see later tokens).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

from kvsplice.errors import KVSpliceError


class PeerError(KVSpliceError):
    """Bad peer name or parameters."""


PEERS: dict[str, type["Peer"]] = {}


def register_peer(cls: type["Peer"]) -> type["Peer"]:
    """Class decorator: make a peer constructible by its `name`."""
    if cls.name in PEERS and PEERS[cls.name] is not cls:
        raise PeerError(f"peer name {cls.name!r} registered twice")
    PEERS[cls.name] = cls
    return cls


def get_peer(name: str, **params: Any) -> "Peer":
    """Build a peer by registry name; PeerError naming the known peers / fields otherwise."""
    import kvsplice.peers  # noqa: F401  (registers the built-in peers)

    if name not in PEERS:
        raise PeerError(f"unknown peer {name!r}; expected one of {sorted(PEERS)}")
    cls = PEERS[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise PeerError(f"peer {name!r}: unknown parameter(s) {unknown}; expected some of {sorted(known)}")
    return cls(**params)


def peer_names() -> list[str]:
    import kvsplice.peers  # noqa: F401

    return sorted(PEERS)


def check_int(owner: str, name: str, v: Any, lo: int = 0) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise PeerError(f"{owner}.{name} must be an integer >= {lo}, got {v!r}")


def check_choice(owner: str, name: str, v: Any, choices: tuple) -> None:
    if v not in choices:
        raise PeerError(f"{owner}.{name} must be one of {choices}, got {v!r}")


class Peer:
    """Base of the peer dataclasses. Subclasses set `name`, `teacher_forced_exact`, `needs_attention`
    (True: the cache needs the "kvsplice" attention function, i.e. it prunes) and implement
    `cache_factory` and `setting`."""

    name: ClassVar[str] = ""
    teacher_forced_exact: ClassVar[bool] = False

    def cache_factory(self, model: Any) -> Callable[[], Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def setting(self) -> str:
        """Short human-readable parameter string, e.g. "bits=2 g=32 R=32"."""
        return " ".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
