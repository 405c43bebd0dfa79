"""A bank of fitted codecs keyed by (layer, head) <-> one safetensors file. Never pickle.

File layout (FORMAT_VERSION "1"):

    tensors   "<layer>.<head>.<name>"  for every state tensor of every codec (head -1 = one codec
              joint over all KV heads of the layer; its vectors are the heads concatenated)
    metadata  (all strings)
        format          "kvsplice-geometry"
        format_version  FORMAT_VERSION
        keys            JSON [[layer, head], ...], sorted
        key_layout      the tensor naming rule above, in words
        codec           codec name ("a,b" if the bank mixes codecs)
        params          JSON of the codecs' constructor parameters (of the first key if they differ)
        head_dim        from meta["head_dim"], else the common dimension of the per-head codecs
        rank            latent dimension k (the largest if they differ)
        calibration     free-form description (meta["calibration"])
        meta            JSON of Geometry.meta
        codec/<l>.<h>   JSON of that codec's `metadata()` (name, params, dim, latent_dim, fit info)
        content_sha256  SHA-256 of the metadata above and every tensor's name, dtype, shape and bytes

Saving is atomic (temporary file in the same directory, fsync, os.replace) and deterministic: the
same codecs and meta give the same bytes (metadata keys are written sorted; safetensors orders
them by hash otherwise). Loading checks format, version, checksum, keys, every codec's tensors
(names, shapes, dtypes, via the codec and a probe round trip) and raises GeometryError on anything wrong.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from kvsplice.codecs.base import Codec
from kvsplice.errors import GeometryError, KVSpliceError

FORMAT = "kvsplice-geometry"
FORMAT_VERSION = "1"
KEY_LAYOUT = (
    "tensor '<layer>.<head>.<name>' holds state tensor <name> of the codec for (layer, head); "
    "head -1 = one codec joint over all KV heads of the layer (vector = heads concatenated)"
)
_CHUNK = 1 << 20


@dataclass
class Geometry:
    """codecs: {(layer, head): fitted Codec}; meta: free-form strings (model, target, calibration, ...)."""

    codecs: dict[tuple[int, int], Codec]
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.codecs:
            raise GeometryError("a geometry needs at least one codec, got none")
        for key, codec in self.codecs.items():
            ok = isinstance(key, tuple) and len(key) == 2 and all(isinstance(v, int) for v in key)
            if not ok or key[0] < 0 or key[1] < -1:
                raise GeometryError(f"geometry keys must be (layer >= 0, head >= -1) int pairs, got {key!r}")
            if not isinstance(codec, Codec) or codec.dim is None:
                raise GeometryError(f"geometry entry {key} must be a fitted Codec, got {codec!r}")
        bad = {k: v for k, v in self.meta.items() if not (isinstance(k, str) and isinstance(v, str))}
        if bad:
            raise GeometryError(f"geometry meta must map str -> str, found {bad!r}")

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.codecs})

    def codec_for(self, layer: int, head: int) -> Codec:
        """The codec of (layer, head); head -1 for a joint codec."""
        try:
            return self.codecs[(layer, head)]
        except KeyError:
            raise GeometryError(f"geometry has no codec for (layer={layer}, head={head}); keys: {sorted(self.codecs)}") from None

    @property
    def codec_name(self) -> str:
        return ",".join(sorted({c.name for c in self.codecs.values()}))

    @property
    def rank(self) -> int:
        """Latent dimension k of the codecs (the largest if they differ)."""
        return max(c.latent_dim for c in self.codecs.values())

    def check_compatible(self, num_layers: int, num_kv_heads: int, head_dim: int) -> None:
        """GeometryError unless every codec fits a model with these dimensions."""
        for nm, want in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if nm in self.meta and self.meta[nm] != str(want):
                raise GeometryError(f"geometry was calibrated for {nm}={self.meta[nm]}, the model has {nm}={want}")
        for layer in self.layers:
            if layer >= num_layers:
                raise GeometryError(f"geometry has codecs for layer {layer}, the model has {num_layers} layers")
            heads = sorted(h for lay, h in self.codecs if lay == layer)
            if heads != [-1] and heads != list(range(num_kv_heads)):
                raise GeometryError(
                    f"layer {layer}: expected one joint codec (head -1) or heads 0..{num_kv_heads - 1}, found heads {heads}"
                )
            for h in heads:
                want = num_kv_heads * head_dim if h == -1 else head_dim
                dim = self.codecs[(layer, h)].dim
                if dim != want:
                    raise GeometryError(f"codec ({layer}, {h}) has dimension {dim}, the model needs {want}")


# -- serialisation --------------------------------------------------------------------------------
def _digest(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in metadata.items() if k != "content_sha256"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"\0{name}\0{str(t.dtype)}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _canonical(data: bytes) -> bytes:
    """Rewrite a safetensors blob's JSON header with sorted keys (same tensors, same data bytes)."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + n :]


def serialize(geometry: Geometry) -> bytes:
    """Geometry -> the bytes of its file (deterministic)."""
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    keys = sorted(geometry.codecs)
    for layer, head in keys:
        codec = geometry.codecs[(layer, head)]
        for name, t in codec.state_tensors().items():
            tensors[f"{layer}.{head}.{name}"] = t.detach().to("cpu").contiguous().clone()
        metadata[f"codec/{layer}.{head}"] = json.dumps(codec.metadata(), sort_keys=True)
    first = geometry.codecs[keys[0]]
    per_head = {c.dim for (_, h), c in geometry.codecs.items() if h != -1}
    metadata.update(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        keys=json.dumps([list(k) for k in keys]),
        key_layout=KEY_LAYOUT,
        codec=geometry.codec_name,
        params=json.dumps(first.params, sort_keys=True),
        head_dim=geometry.meta.get("head_dim", str(per_head.pop()) if len(per_head) == 1 else ""),
        rank=str(geometry.rank),
        calibration=geometry.meta.get("calibration", ""),
        meta=json.dumps(geometry.meta, sort_keys=True),
    )
    metadata["content_sha256"] = _digest(metadata, tensors)
    return _canonical(st_save(tensors, metadata))


def _write_all(f, data: bytes) -> None:
    view = memoryview(data)
    for i in range(0, len(view), _CHUNK):
        f.write(view[i : i + _CHUNK])


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            _write_all(f, data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_geometry(path: str | os.PathLike, geometry: Geometry) -> None:
    """Write `geometry` to `path` atomically: an interrupted save leaves any old file untouched."""
    _atomic_write(Path(path), serialize(geometry))


def deserialize(data: bytes, source: str = "<bytes>") -> Geometry:
    """The inverse of `serialize`; GeometryError (naming `source`) on anything wrong."""
    try:
        tensors = st_load(data)
        n = struct.unpack("<Q", data[:8])[0]
        metadata = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
    except Exception as e:  # safetensors raises its own error types; the message is what matters
        raise GeometryError(f"{source}: not a readable safetensors file (corrupted or truncated?): {e}") from e
    if metadata.get("format") != FORMAT:
        raise GeometryError(f"{source}: not a kvsplice geometry file (format={metadata.get('format')!r}, expected {FORMAT!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise GeometryError(
            f"{source}: geometry format version {metadata.get('format_version')!r}, this kvsplice reads {FORMAT_VERSION!r}"
        )
    if metadata.get("content_sha256") != _digest(metadata, tensors):
        raise GeometryError(f"{source}: checksum mismatch: the file is corrupted or was edited")
    try:
        keys = [tuple(int(v) for v in k) for k in json.loads(metadata["keys"])]
        meta = json.loads(metadata["meta"])
        codecs: dict[tuple[int, int], Codec] = {}
        used: set[str] = set()
        for layer, head in keys:
            prefix = f"{layer}.{head}."
            own = {n[len(prefix) :]: t for n, t in tensors.items() if n.startswith(prefix)}
            used.update(prefix + n for n in own)
            codec = Codec.from_state(own, json.loads(metadata[f"codec/{layer}.{head}"]))
            _probe(codec, (layer, head))
            codecs[(layer, head)] = codec
    except GeometryError as e:
        raise GeometryError(f"{source}: {e}") from e
    except (KVSpliceError, KeyError, ValueError, TypeError, RuntimeError) as e:
        raise GeometryError(f"{source}: inconsistent geometry file: {type(e).__name__}: {e}") from e
    if set(tensors) - used:
        raise GeometryError(f"{source}: tensors that belong to no key: {sorted(set(tensors) - used)}")
    geometry = Geometry(codecs, meta)
    if metadata.get("rank") != str(geometry.rank):
        raise GeometryError(f"{source}: metadata rank {metadata.get('rank')!r} but the codecs have rank {geometry.rank}")
    hd = metadata.get("head_dim", "")
    for (layer, head), c in codecs.items():
        if hd and head != -1 and str(c.dim) != hd:
            raise GeometryError(f"{source}: codec ({layer}, {head}) has dimension {c.dim}, metadata head_dim is {hd}")
    return geometry


def _probe(codec: Codec, key: tuple[int, int]) -> None:
    """Round-trip one zero vector: catches state tensors whose shapes disagree with the params."""
    z = codec.compress(torch.zeros(2, codec.dim))
    x = codec.decompress(z)
    if tuple(z.shape) != (2, codec.latent_dim) or tuple(x.shape) != (2, codec.dim) or not bool(torch.isfinite(x).all()):
        raise GeometryError(f"codec {key} does not round-trip a probe vector: latent {tuple(z.shape)}, output {tuple(x.shape)}")


def load_geometry(path: str | os.PathLike) -> Geometry:
    """Read a file written by `save_geometry`; GeometryError on a missing/corrupted/mismatched file."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise GeometryError(f"cannot read geometry file {p}: {e}") from e
    return deserialize(data, str(p))
