"""The storage format: a prompt's `CompressedCache` in one safetensors file, codes entropy-coded.

    pack(cache, path, model=model, recipe=recipe, input_ids=ids, attention_mask=mask)
    stored = load_packed(path, model, recipe)    # .cache (a CompressedCache), .input_ids, .attention_mask, .meta
    cache = unpack(path, model, recipe)          # the cache alone

For offload and prompt reuse (no random access needed). The restored cache is bit-identical to the
packed one: same payload bytes, raw / sink rows, positions, lengths; the next tokens get exactly the
same logits (tests/test_storage.py).

File layout (safetensors: a JSON header then raw little-endian tensors; never pickle):
    metadata "kvsplice"         JSON: format, version, model id, recipe hash, coder, dtype, batch,
                                length, window, sink, span, per-(layer, kind) entries, content digest
    L{l}.{k|v}.raw / .head      (B, H, R, D) raw window rows, (B, H, sink, D) exact sink rows (model dtype)
    L{l}.{k|v}.p.{name}         payload entries stored as they are (e.g. pca-q "gain" fp16 (B, H', P, 1))
    tokens.positions / .sink_rows   TokenIndex (B, S) int32, (B, sink) int64
    input_ids / attention_mask  (B, T) int64: the prompt, so a reader can continue it
    codes.{array}               every bit-packed "codes" payload of a transform codec (pca-q: codec.alloc
                                bits per coefficient), unpacked with the codec's own layout and coded as
                                one column per (layer, kind, head', coefficient) over the B x P rows,
                                by kvsplice/entropy.py (`coder`: "rans" default, "zlib", "lzma")
Rows are read from the cache's attributes (k_rows / v_rows `_Rows`, the shared `TokenIndex`); caches
this format cannot hold exactly (a pruner, an unknown layer class) are refused, not approximated.
Sliding-window layers (Gemma 3) store the rows they hold and their `dropped` count; their codes go to a
second stream group (`codes1.*`, header "code_groups": rows per group) because they hold fewer rows.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvsplice import entropy
from kvsplice.errors import KVSpliceError

FORMAT, VERSION = "kvsplice-prompt-cache", 1
KINDS = ("k", "v")


class StorageError(KVSpliceError):
    """A packed cache file is unreadable, corrupted, or does not match the model / recipe / cache."""


def recipe_hash(recipe: Any) -> str:
    """SHA-256 over the recipe's model id, sink and its geometries' serialised bytes (deterministic)."""
    from kvsplice.geometry import serialize

    h = hashlib.sha256(json.dumps({"model": recipe.model, "sink": recipe.sink}, sort_keys=True).encode())
    for target in KINDS:
        geo = getattr(recipe, target)
        h.update(f"\0{target}\0".encode() + (b"-" if geo is None else hashlib.sha256(serialize(geo)).digest()))
    return h.hexdigest()


def _widths(layer_codec: Any) -> list[list[int]] | None:
    """Per head' codec: the bits of each coefficient (transform codecs with an `alloc`), else None."""
    alloc = [getattr(c, "alloc", None) for c in layer_codec.codecs]
    return None if any(a is None for a in alloc) else [[int(b) for b in a.tolist()] for a in alloc]


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""  # an empty stream has no bytes
        h.update(f"\0{name}\0{t.dtype}\0{list(t.shape)}\0".encode() + data)
    return h.hexdigest()


def _layers(cache: Any) -> list[Any]:
    from kvsplice.cache import CompressedCache, CompressedLayer

    if not isinstance(cache, CompressedCache):
        raise StorageError(f"pack takes a CompressedCache, got {type(cache).__name__}")
    if cache.pruner is not None:
        raise StorageError("a cache with a pruner cannot be packed (its pruning statistics are not stored)")
    for i, layer in enumerate(cache.layers):
        if type(layer) is not CompressedLayer or not layer.is_initialized or layer.key_positions is not None:
            raise StorageError(f"layer {i}: expected an initialised CompressedLayer between steps, found "
                               f"{type(layer).__name__} (initialised: {getattr(layer, 'is_initialized', None)})")
    return list(cache.layers)


def pack(cache: Any, path: str | os.PathLike, *, model: Any, recipe: Any, input_ids: torch.Tensor | None = None,
         attention_mask: torch.Tensor | None = None, meta: dict | None = None, coder: str = "rans") -> dict:
    """Write `cache` (prefilled through `recipe.cache(model)`) to `path` atomically. input_ids /
    attention_mask (B, T): the prompt it holds (stored so that a reader can continue it). meta: extra
    JSON-able fields. Returns the header dict written (with "file_bytes")."""
    from safetensors.torch import save

    from kvsplice.codecs.packing import layout, unpack_fast
    from kvsplice.loading import model_id
    from kvsplice.paths import atomic_write_bytes

    if coder not in entropy.CODERS:
        raise StorageError(f"unknown coder {coder!r}; expected one of {sorted(entropy.CODERS)}")
    layers = _layers(cache)
    first = layers[0]
    B, length = first.batch_size, first.length
    tensors: dict[str, torch.Tensor] = {}
    entries = []
    groups: dict[int, tuple[list, list]] = {}  # rows held -> (code columns, their widths): a sliding layer holds fewer
    for l, layer in enumerate(layers):
        if layer.length != length or layer.batch_size != B:
            raise StorageError(f"layer {l} holds {layer.length} tokens x {layer.batch_size} sequences, layer 0 "
                               f"{length} x {B}")
        for kind in KINDS:
            rows = getattr(layer, f"{kind}_rows")
            e = {"layer": l, "kind": kind, "coded": rows.codec is not None, "payload": {}, "codes": None, "dropped": layer.dropped}
            for part in ("raw", "head"):
                t = getattr(rows, part)
                e[part] = None if t is None else list(t.shape)
                if t is not None:
                    tensors[f"L{l}.{kind}.{part}"] = t.detach().cpu().contiguous()
            widths = _widths(rows.codec) if rows.codec is not None else None
            for name, t in (rows.payload or {}).items():
                e["payload"][name] = [list(t.shape), str(t.dtype)]
                if name == "codes" and widths is not None and t.dtype == torch.uint8:
                    Bp, Hp, P, _ = t.shape  # (B, H', P, nbytes)
                    columns, widths_all = groups.setdefault(Bp * P, ([], []))
                    for h, w in enumerate(widths):
                        lay = layout(tuple(w))
                        codes = unpack_fast(t[:, h].cpu(), lay, torch.uint8)  # (B, P, k) stored codes only
                        columns.append(codes.reshape(Bp * P, -1).numpy())
                        widths_all.extend(b for b in w if b > 0)
                    e["codes"] = {"rows": Bp * P, "widths": widths}
                else:
                    tensors[f"L{l}.{kind}.p.{name}"] = t.detach().cpu().contiguous()
            entries.append(e)
    for g, (rows_n, (columns, widths_all)) in enumerate(sorted(groups.items(), reverse=True)):
        sym = np.ascontiguousarray(np.concatenate(columns, axis=1))  # (N, K): the coefficients of every layer holding N rows
        for name, a in entropy.encode(coder, sym, np.asarray(widths_all, dtype=np.int64)).items():
            tensors[f"codes.{name}" if g == 0 else f"codes{g}.{name}"] = torch.from_numpy(np.array(a))  # a writable copy
    tokens = cache.tokens
    if tokens is not None:
        if tokens.length != length:
            raise StorageError(f"the cache's token index holds {tokens.length} rows, its layers {length}")
        for name in ("positions", "sink_rows"):
            t = getattr(tokens, name)
            if t is not None:
                tensors[f"tokens.{name}"] = t.detach().cpu().contiguous()
    for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask)):
        if t is not None:
            if t.ndim != 2 or t.shape[0] != B or t.shape[1] > length:
                raise StorageError(f"{name} must be (B={B}, T <= {length}), got {tuple(t.shape)}")
            tensors[name] = t.detach().cpu().to(torch.int64).contiguous()
    header = {
        "format": FORMAT, "version": VERSION, "model": model_id(model), "recipe": recipe_hash(recipe),
        "recipe_description": recipe.describe(), "coder": coder, "dtype": str(first.dtype), "batch": B,
        "length": length, "num_layers": len(layers), "num_heads": first.num_heads, "head_dim": first.head_dim,
        "window": cache.window, "sink": recipe.sink, "span": None if tokens is None else tokens.span,
        "code_rows": max(groups, default=0), "code_groups": sorted(groups, reverse=True), "entries": entries, "extra": meta or {},
        "digest": _digest(tensors),
    }
    data = save(tensors, {"kvsplice": json.dumps(header, sort_keys=True)})
    atomic_write_bytes(Path(path), data)
    return {**header, "file_bytes": len(data)}


@dataclass
class Packed:
    """What `load_packed` returns: the restored cache, the prompt (B, T) int64 (or None) and the header."""

    cache: Any
    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    meta: dict


def read_header(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(header, tensors) of a packed file, digest checked; StorageError on anything unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        data = Path(path).read_bytes()
        tensors = load(data)
        n = int.from_bytes(data[:8], "little")
        header = json.loads(json.loads(data[8 : 8 + n])["__metadata__"]["kvsplice"])
    except FileNotFoundError:
        raise StorageError(f"{path}: no such packed cache file") from None
    except (OSError, SafetensorError, ValueError, KeyError, TypeError) as e:
        raise StorageError(f"{path}: not a kvsplice packed cache ({type(e).__name__}: {e})") from e
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise StorageError(f"{path}: expected format {FORMAT!r}, found {header.get('format') if isinstance(header, dict) else header!r}")
    if header.get("version") != VERSION:
        raise StorageError(f"{path}: format version {header.get('version')!r}, this kvsplice reads {VERSION}")
    if _digest(tensors) != header.get("digest"):
        raise StorageError(f"{path}: tensor contents differ from the digest in the header (file corrupted)")
    return header, tensors


def values_held(h: dict) -> int:
    """K and V values the stored cache holds (header `h`): a sliding layer holds its window only (each
    (layer, kind) entry records its dropped rows) -> sum over entries of rows x batch x KV heads x head_dim."""
    return sum(h["length"] - e.get("dropped", 0) for e in h["entries"]) * h["batch"] * h["num_heads"] * h["head_dim"]


def _expect(tensors: dict, name: str, shape: list | None, dtype: Any, path: Any) -> torch.Tensor | None:
    t = tensors.get(name)
    if shape is None:
        if t is not None:
            raise StorageError(f"{path}: unexpected tensor {name}")
        return None
    if t is None or list(t.shape) != list(shape) or (dtype is not None and str(t.dtype) != str(dtype)):
        found = None if t is None else f"{t.dtype} {list(t.shape)}"
        raise StorageError(f"{path}: {name} must be {dtype} {shape}, found {found}")
    return t


def code_groups(h: dict, tensors: dict[str, torch.Tensor]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{rows N: (codes (N, K), bit widths (K,))} of a packed file's code streams, one group per row
    count (full-attention layers; sliding ones hold fewer rows). EntropyError on a corrupted stream."""
    groups = h.get("code_groups", [h["code_rows"]] if h["code_rows"] else [])  # files before sliding layers: one group
    out = {}
    for g, n in enumerate(groups):
        widths = np.asarray([b for e in h["entries"] if e["codes"] and e["codes"]["rows"] == n
                             for w in e["codes"]["widths"] for b in w if b > 0], dtype=np.int64)
        prefix = "codes." if g == 0 else f"codes{g}."
        arrays = {k[len(prefix):]: t.numpy() for k, t in tensors.items() if k.startswith(prefix)}
        out[n] = (entropy.decode(h["coder"], arrays, n, widths), widths)
    return out


def load_packed(path: str | os.PathLike, model: Any, recipe: Any) -> Packed:
    """Restore a packed cache for `model` with `recipe` (checked: model id, recipe hash, dtype,
    layout, every tensor's shape and dtype, lengths, the code streams)."""
    from kvsplice.cache import model_layout
    from kvsplice.codecs.packing import layout, pack_fast, scatter_codes
    from kvsplice.loading import model_id

    h, tensors = read_header(path)
    if h["model"] != model_id(model):
        raise StorageError(f"{path}: packed with model {h['model']!r}, the model is {model_id(model)!r}")
    if h["recipe"] != recipe_hash(recipe):
        raise StorageError(f"{path}: packed with recipe {h['recipe'][:12]}... ({h.get('recipe_description')}), "
                           f"the given recipe is {recipe_hash(recipe)[:12]}... ({recipe.describe()})")
    param = next(model.parameters())
    if h["dtype"] != str(param.dtype):
        raise StorageError(f"{path}: packed from a {h['dtype']} model, the model runs in {param.dtype}")
    num_layers, H, D = model_layout(model)
    if (h["num_layers"], h["num_heads"], h["head_dim"]) != (num_layers, H, D):
        raise StorageError(f"{path}: packed for {h['num_layers']} layers x {h['num_heads']} heads x {h['head_dim']}, "
                           f"the model has {num_layers} x {H} x {D}")
    cache = recipe.cache(model, window=h["window"])
    B, length, dtype, dev = h["batch"], h["length"], param.dtype, param.device
    entries = {(e["layer"], e["kind"]): e for e in h["entries"]}
    if len(entries) != 2 * num_layers or len(h["entries"]) != 2 * num_layers:
        raise StorageError(f"{path}: expected {2 * num_layers} (layer, kind) entries, found {len(h['entries'])}")
    sym = {n: a for n, (a, _) in code_groups(h, tensors).items()}
    col = {n: 0 for n in sym}
    for l, layer in enumerate(cache.layers):
        like = torch.zeros(B, H, 0, D, dtype=dtype, device=dev)
        layer.lazy_initialization(like, like)
        dropped = {entries[(l, k)].get("dropped", 0) if (l, k) in entries else None for k in KINDS}
        if len(dropped) != 1 or not isinstance(d := next(iter(dropped)), int) or d < 0 or (d and not layer.is_sliding):
            raise StorageError(f"{path}: layer {l}: dropped rows {sorted(map(str, dropped))} do not fit a "
                               f"{'sliding' if layer.is_sliding else 'full-attention'} layer")
        if layer.is_sliding and d != max(0, length - (layer.sliding_window - 1)):
            raise StorageError(f"{path}: layer {l}: {d} dropped rows; a sliding layer of window {layer.sliding_window} "
                               f"holding {length} tokens drops {max(0, length - (layer.sliding_window - 1))}")
        layer.dropped = d
        if d and hasattr(layer.view, "dropped"):
            layer.view.dropped = d
        for kind in KINDS:
            e, rows = entries.get((l, kind)), getattr(layer, f"{kind}_rows")
            if e is None or e["coded"] != (rows.codec is not None):
                raise StorageError(f"{path}: layer {l} {kind.upper()}: stored {'coded' if e and e['coded'] else 'raw'} "
                                   f"rows, the recipe {'codes' if rows.codec is not None else 'does not code'} them")
            for part in ("raw", "head"):
                want = None if getattr(rows, part) is None else e[part]
                if getattr(rows, part) is not None and e[part] is None:
                    if part != "head" or not d:
                        raise StorageError(f"{path}: layer {l} {kind.upper()}: no {part} rows stored, the recipe's cache holds them")
                    rows.head = None  # a sliding layer freed its sink copy (the sink row left the window)
                    continue
                t = _expect(tensors, f"L{l}.{kind}.{part}", want, dtype, path)
                if t is not None:
                    setattr(rows, part, t.to(dev))
            payload, P = {}, 0
            for name, (shape, dt) in e["payload"].items():
                if name == "codes" and e["codes"] is not None:
                    widths = _widths(rows.codec)
                    if widths != e["codes"]["widths"]:
                        raise StorageError(f"{path}: layer {l} {kind.upper()}: stored code widths differ from the recipe's codec")
                    n = e["codes"]["rows"]
                    if n not in sym:
                        raise StorageError(f"{path}: layer {l} {kind.upper()}: {n} code rows, the streams hold {sorted(sym)}")
                    per_head = []
                    for w in widths:
                        lay = layout(tuple(w))
                        k = len(lay.index)
                        stored = torch.from_numpy(sym[n][:, col[n] : col[n] + k].astype(np.int64)).reshape(shape[0], shape[2], k)
                        per_head.append(pack_fast(scatter_codes(stored, lay), lay))
                        col[n] += k
                    t = torch.stack(per_head, 1)
                    if list(t.shape) != shape:
                        raise StorageError(f"{path}: layer {l} {kind.upper()} codes rebuild as {list(t.shape)}, header says {shape}")
                else:
                    t = _expect(tensors, f"L{l}.{kind}.p.{name}", shape, dt, path)
                payload[name] = t.to(dev)
                P = shape[2]
            rows.payload = payload or None
            held = P + (rows.raw.shape[2] if rows.raw is not None else 0)
            if held != length - d or (rows.raw is not None and rows.raw.shape[0] != B):
                raise StorageError(f"{path}: layer {l} {kind.upper()} holds {held} rows, the header says {length} - {d} dropped")
        layer.length = length
    for n, a in sym.items():
        if col[n] != a.shape[1]:
            raise StorageError(f"{path}: {a.shape[1] - col[n]} coded columns left over (entries and streams disagree)")
    if cache.tokens is not None:
        tok = cache.tokens
        pos = _expect(tensors, "tokens.positions", [B, length] if tok.keep_positions else [B, 0], torch.int32, path)
        sink_rows = _expect(tensors, "tokens.sink_rows", [B, tok.sink], torch.int64, path)
        tok.positions, tok.sink_rows = pos.to(dev), sink_rows.to(dev)
        tok.length, tok.span, tok._last = length, None if h["span"] is None else tuple(h["span"]), None
    ids = tensors.get("input_ids")
    mask = tensors.get("attention_mask")
    for name, t in (("input_ids", ids), ("attention_mask", mask)):
        if t is not None and (t.ndim != 2 or t.shape[0] != B or t.dtype != torch.int64):
            raise StorageError(f"{path}: {name} must be int64 (B={B}, T), found {t.dtype} {tuple(t.shape)}")
    return Packed(cache, ids, mask, h)


def unpack(path: str | os.PathLike, model: Any, recipe: Any) -> Any:
    """The `CompressedCache` stored in `path` (see `load_packed`)."""
    return load_packed(path, model, recipe).cache
