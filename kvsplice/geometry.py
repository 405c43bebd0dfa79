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

import hashlib
import json
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from kvsplice.codecs.base import Codec
from kvsplice.errors import GeometryError, KVSpliceError, KVSpliceWarning
from kvsplice.paths import atomic_write_bytes

FORMAT = "kvsplice-geometry"
FORMAT_VERSION = "1"
KEY_LAYOUT = (
    "tensor '<layer>.<head>.<name>' holds state tensor <name> of the codec for (layer, head); "
    "head -1 = one codec joint over all KV heads of the layer (vector = heads concatenated)"
)
MAX_HEADER_BYTES = 64 << 20  # a geometry's JSON header (metadata of every codec) is far smaller


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
        by_layer: dict[int, set[str]] = {}
        for (layer, _), codec in self.codecs.items():
            by_layer.setdefault(layer, set()).add(f"{codec.name} {json.dumps(codec.params, sort_keys=True)}")
        mixed = {layer: sorted(v) for layer, v in by_layer.items() if len(v) > 1}
        if mixed:  # the cache stacks one layer's per-head payloads: they must share one codec
            layer, kinds = next(iter(sorted(mixed.items())))
            raise GeometryError(f"layer {layer} mixes codecs {kinds}; the heads of one layer must share one codec and parameters")
        if not isinstance(self.meta, dict):
            raise GeometryError(f"geometry meta must be a dict of str -> str, found {type(self.meta).__name__}")
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

    def check_model(self, model: Any, allow_other_model: bool = False, source: str = "geometry") -> bool:
        """Warn (KVSpliceWarning) when meta["model"] names another model than `model` (a loaded model,
        or its id as a str); `allow_other_model` silences it. Layouts are checked by check_compatible;
        this catches a geometry of another model WITH the same layout. True when the ids match or the
        geometry names no model."""
        from kvsplice.loading import model_id

        want = self.meta.get("model")
        found = model if isinstance(model, str) else model_id(model)
        if not want or want == found:
            return True
        if not allow_other_model:
            warnings.warn(f"{source} was calibrated on {want!r}, the model is {found!r}; results may be worse than "
                          "measured (--allow-other-model / allow_other_model=True silences this)", KVSpliceWarning, stacklevel=2)
        return False

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


def save_geometry(path: str | os.PathLike, geometry: Geometry) -> None:
    """Write `geometry` to `path` atomically: an interrupted save leaves any old file untouched (and
    the temporary file of a killed save is removed by the next save, kvsplice.paths)."""
    atomic_write_bytes(Path(path), serialize(geometry))


def deserialize(data: bytes, source: str = "<bytes>") -> Geometry:
    """The inverse of `serialize`; GeometryError (naming `source`) on anything wrong."""
    _check_header_size(len(data), data[:8], source)
    try:
        tensors = st_load(data)
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8 : 8 + n])
    except Exception as e:  # safetensors raises its own error types; the message is what matters
        raise GeometryError(f"{source}: not a readable safetensors file (corrupted or truncated?): {e}") from e
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise GeometryError(f"{source}: safetensors metadata must be an object of strings, found {type(metadata).__name__}")
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
        if any(len(k) != 2 for k in keys):
            raise GeometryError(f"metadata 'keys' must be [layer, head] pairs, found {keys[:5]}")
        meta = json.loads(metadata["meta"])
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise GeometryError(f"metadata 'meta' must be a JSON object of strings, found {str(metadata['meta'])[:80]!r}")
        codecs: dict[tuple[int, int], Codec] = {}
        used: set[str] = set()
        for layer, head in keys:
            prefix = f"{layer}.{head}."
            own = {n[len(prefix) :]: t for n, t in tensors.items() if n.startswith(prefix)}
            used.update(prefix + n for n in own)
            cmeta = json.loads(metadata[f"codec/{layer}.{head}"])
            if not isinstance(cmeta, dict):
                raise GeometryError(f"metadata 'codec/{layer}.{head}' must be a JSON object, found {type(cmeta).__name__}")
            codec = Codec.from_state(own, cmeta, validate=True)  # exact shapes/dtypes, finite, bounded
            _probe(codec, (layer, head))
            codecs[(layer, head)] = codec
    except GeometryError as e:
        raise GeometryError(f"{source}: {e}") from e
    except (KVSpliceError, KeyError, ValueError, TypeError, RuntimeError) as e:
        raise GeometryError(f"{source}: inconsistent geometry file: {type(e).__name__}: {e}") from e
    if set(tensors) - used:
        raise GeometryError(f"{source}: tensors that belong to no key: {sorted(set(tensors) - used)}")
    try:
        geometry = Geometry(codecs, meta)
    except GeometryError as e:
        raise GeometryError(f"{source}: {e}") from e
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


def _check_header_size(size: int, first8: bytes, source: str) -> None:
    """GeometryError unless the 8-byte header length fits in the file and under MAX_HEADER_BYTES."""
    if size < 8 or len(first8) < 8:
        raise GeometryError(f"{source}: not a readable safetensors file: {size} bytes, shorter than its 8-byte header length")
    n = struct.unpack("<Q", first8[:8])[0]
    if n > size - 8 or n > MAX_HEADER_BYTES:
        raise GeometryError(f"{source}: safetensors header claims {n} bytes; the file has {size - 8} after the length "
                            f"field (limit {MAX_HEADER_BYTES}): corrupted or not a geometry file")


def load_geometry(path: str | os.PathLike, model: Any = None, allow_other_model: bool = False) -> Geometry:
    """Read a file written by `save_geometry`; GeometryError on a missing/corrupted/mismatched file.
    The header length is checked against the file size before the body is read. With `model` (a
    loaded model or its id), warn when the geometry was calibrated on another model (see check_model)."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            first8 = f.read(8)
            _check_header_size(size, first8, str(p))
            data = first8 + f.read()
    except IsADirectoryError as e:
        raise GeometryError(f"geometry path {p} is a directory; expected a .safetensors file") from e
    except OSError as e:
        raise GeometryError(f"cannot read geometry file {p}: {e.strerror or e}") from e
    geometry = deserialize(data, str(p))
    if model is not None:
        geometry.check_model(model, allow_other_model, source=f"geometry {p}")
    return geometry
