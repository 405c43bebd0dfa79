"""One capture mechanism for every transformers model: K and V exactly where the cache receives them.

Inside `capture_kv(model, attention_modules, sink)`, every forward of `model` reports, per attention
layer, the tensors the layer hands to `cache.update(key_states, value_states, layer_idx, ...)`:
after any per-head q/k norm (Qwen 3, Gemma 3), K after the rotary embedding (RoPE), V as projected.
What is calibrated is therefore what a cache stores, whatever the family's projections look like
(GPT-2's fused `c_attn`, Phi-3's fused `qkv_proj`, separate `k_proj`/`v_proj`).

Pre-RoPE K is recovered by inverting the model's own rotary embedding: a forward pre-hook on each
attention module takes the `position_embeddings` (cos, sin) the model passes to THAT layer (Gemma 3
computes different tables per layer type: sliding vs global), so the positions are the ones the model
used (left padding, offsets after a cache). With y = x*cos + rotate_half(x)*sin on the first
`cos.shape[-1]` dims (partial rotary, Phi-3 style, leaves the rest alone), the inverse is

    x = (y*cos - rotate_half(y)*sin) / (cos^2 + sin^2)

exact up to float rounding, also with an attention scaling folded into cos/sin. A layer whose
attention has no `position_embeddings` parameter (GPT-2) has no RoPE: pre-RoPE K is K.

How: a pre-hook on the top model gives the forward a `DynamicCache(config=...)` when the caller
passed none (e.g. `use_cache=False`), so every attention calls `cache.update`; each attention's
pre-hook wraps `update` of the cache object it is about to use (instance attribute) and its forward
hook (always called, also on error) removes the wrapper. All hooks are removed when the block exits.
The model's outputs are unchanged: the wrapper returns what the cache returns.

The sink receives a `CapturedKV` per layer per forward (detached tensors, model dtype and device).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from kvsplice.errors import ModelError
from kvsplice.rope import rotate_half  # one RoPE convention for capture and the cache


def _broadcast(t: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """cos/sin (B or 1, T, R) -> (B or 1, 1, T, R) against k (B, H, T, D)."""
    if t.dim() == 2:  # (T, R)
        t = t[None]
    if t.dim() != 3 or t.shape[-2] != k.shape[-2]:
        raise ModelError(f"expected rotary cos/sin of shape (B, T={k.shape[-2]}, R), found {tuple(t.shape)}")
    return t[:, None].to(k.dtype)


def apply_rope(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """k (B, H, T, D), cos/sin (B, T, R) with R <= D -> k rotated on its first R dims (as the model does)."""
    c, s = _broadcast(cos, k), _broadcast(sin, k)
    R = c.shape[-1]
    rot = k[..., :R] * c + rotate_half(k[..., :R]) * s
    return torch.cat([rot, k[..., R:]], dim=-1) if R < k.shape[-1] else rot


def invert_rope(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of `apply_rope`: post-RoPE k (B, H, T, D) -> pre-RoPE k, same shape."""
    c, s = _broadcast(cos, k), _broadcast(sin, k)
    R = c.shape[-1]
    if R > k.shape[-1] or R % 2:
        raise ModelError(f"rotary width {R} must be even and <= head_dim {k.shape[-1]}")
    y = k[..., :R]
    pre = (y * c - rotate_half(y) * s) / (c * c + s * s)
    return torch.cat([pre, k[..., R:]], dim=-1) if R < k.shape[-1] else pre


@dataclass
class CapturedKV:
    """What one attention layer handed to its cache in one forward.

    keys / values: (B, H_kv, T, head_dim) exactly as `cache.update` received them (K post-RoPE).
    cos / sin: (B, T, R) the rotary tables the model passed to this layer (None: no RoPE)."""

    layer: int
    keys: torch.Tensor
    values: torch.Tensor
    cos: torch.Tensor | None
    sin: torch.Tensor | None

    @property
    def keys_pre_rope(self) -> torch.Tensor:
        """(B, H_kv, T, head_dim): K before the rotary embedding (K itself when there is none)."""
        return self.keys if self.cos is None else invert_rope(self.keys, self.cos, self.sin)


Sink = Callable[[CapturedKV], None]


def _cache_arg(fn) -> str | None:
    """Name of the cache parameter of a forward ('cache' in transformers >= 5.2x, else 'past_key_values')."""
    params = inspect.signature(fn).parameters
    return next((n for n in ("cache", "past_key_values") if n in params), None)


@contextlib.contextmanager
def capture_kv(
    model: nn.Module, attention_modules: Sequence[nn.Module], sink: Sink, layers: Sequence[int] | None = None
) -> Iterator[None]:
    """Within the block, every forward of `model` calls `sink(CapturedKV)` for each layer in `layers`
    (default all) when that layer's attention hands K/V to its cache. Hooks are removed on exit, also
    when the block (or the sink) raises. ModelError when the model does not use transformers' Cache."""
    from transformers import DynamicCache

    wanted = set(range(len(attention_modules)) if layers is None else layers)
    top_arg = _cache_arg(model.forward)
    if top_arg is None:
        raise ModelError(
            f"{type(model).__name__}.forward takes no `cache` / `past_key_values` argument: kvsplice captures K/V "
            "where transformers' Cache receives them, so it needs a model that uses a Cache"
        )
    rope: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}
    patched: dict[int, object] = {}  # layer -> cache object whose `update` is wrapped now

    def top_pre(module, args, kwargs):
        bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        given = [bound.get(top_arg), kwargs.get("cache"), kwargs.get("past_key_values")]  # either spelling
        if all(c is None for c in given):  # e.g. use_cache=False: give the forward a cache to call
            kwargs = dict(kwargs, **{top_arg: DynamicCache(config=model.config)})
        return args, kwargs

    def make_pre(i: int, attn: nn.Module):
        sig = inspect.signature(attn.forward)
        has_rope = "position_embeddings" in sig.parameters
        arg = _cache_arg(attn.forward)
        if arg is None:
            raise ModelError(f"layer {i}: {type(attn).__name__}.forward takes no cache argument; expected `cache` (transformers' attention interface)")

        def pre(module, args, kwargs):
            bound = sig.bind(*args, **kwargs).arguments
            pe = bound.get("position_embeddings") if has_rope else None
            if has_rope and pe is None:
                raise ModelError(f"layer {i}: {type(attn).__name__} got no position_embeddings (cos, sin) to invert its RoPE")
            rope[i] = None if pe is None else (pe[0].detach(), pe[1].detach())
            cache = bound.get(arg)
            if cache is None:
                raise ModelError(f"layer {i}: {type(attn).__name__} received no cache, so nothing reaches cache.update to capture")
            cache = getattr(cache, "self_attention_cache", cache)  # EncoderDecoderCache (GPT-2): its self-attention part
            original = cache.update

            def update(key_states, value_states, layer_idx, *a, **kw):
                if layer_idx != i:
                    raise ModelError(f"attention module {i} updated the cache as layer {layer_idx}; expected layer {i}")
                if i in wanted:
                    cos, sin = rope[i] if rope[i] is not None else (None, None)
                    sink(CapturedKV(i, key_states.detach(), value_states.detach(), cos, sin))
                return original(key_states, value_states, layer_idx, *a, **kw)

            cache.update = update  # instance attribute: shadows the class method for this call only
            patched[i] = cache

        return pre

    def make_post(i: int):
        def post(module, args, kwargs, out):
            _unpatch(i)

        return post

    def _unpatch(i: int) -> None:
        cache = patched.pop(i, None)
        if cache is not None and "update" in vars(cache):
            del cache.update

    handles = [model.register_forward_pre_hook(top_pre, with_kwargs=True)]
    try:
        for i, attn in enumerate(attention_modules):
            if i not in wanted:
                continue
            handles.append(attn.register_forward_pre_hook(make_pre(i, attn), with_kwargs=True))
            handles.append(attn.register_forward_hook(make_post(i), with_kwargs=True, always_call=True))
        yield
    finally:
        for h in handles:
            h.remove()
        for i in list(patched):
            _unpatch(i)
