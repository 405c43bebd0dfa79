"""ModelAdapter: an architecture's head layout, its attention modules, and where V (and K) come from.

An adapter never changes the model. `capture(target)` is a context manager; every forward of the model
inside the block pushes one tensor per layer:

    with adapter.capture("v") as cap:       # cap.records[layer] -> list of (B, H_kv, T, head_dim)
        model(ids)

or with a callback, called once per layer per forward:

    with adapter.capture("v", sink=lambda layer, x: ...):   # x: (B, H_kv, T, head_dim), detached
        model(ids)

For transformers models the tensors are taken where the cache receives them (kvsplice/capture.py):
V as cached, K before the rotary embedding (the model's own RoPE inverted with the positions it
passed); so a family needs no adapter code for its projections or q/k norms. Models that do not use
transformers' Cache (kvsplice.train's GPT) fall back to forward hooks on a projection
(`_hook_module` / `_split`, GPT-2's fused `c_attn`), also available as `capture_hooks`.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from kvsplice.errors import ModelError

TARGETS = ("v", "k", "k_post")  # k: K before RoPE; k_post: K as the cache receives it (after RoPE)
Sink = Callable[[int, torch.Tensor], None]


class Capture:
    """Receives per-layer tensors (B, H_kv, T, head_dim) during `ModelAdapter.capture`.

    With no callback, tensors are kept in `records[layer]` (a list, one entry per forward)."""

    def __init__(self, target: str, callback: Sink | None = None) -> None:
        self.target = target
        self.callback = callback
        self.records: dict[int, list[torch.Tensor]] = {}
        self.calls = 0  # number of tensors pushed

    def sink(self, layer_idx: int, x: torch.Tensor) -> None:
        self.calls += 1
        if self.callback is not None:
            self.callback(layer_idx, x)
        else:
            self.records.setdefault(layer_idx, []).append(x)


class ModelAdapter(ABC):
    """Head layout + hook points of one architecture. Subclasses set `model_types` and implement
    `attention_modules`, `_hook_module` and `_split`."""

    model_types: tuple[str, ...] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    # -- layout ------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def num_layers(self) -> int: ...

    @property
    @abstractmethod
    def num_q_heads(self) -> int: ...

    @property
    @abstractmethod
    def num_kv_heads(self) -> int: ...

    @property
    @abstractmethod
    def head_dim(self) -> int: ...

    @abstractmethod
    def attention_modules(self) -> list[nn.Module]:
        """The attention module of every decoder layer, in layer order."""

    # -- hook points ---------------------------------------------------------------------------------
    def _hook_module(self, layer_idx: int, target: str) -> nn.Module:
        """The submodule whose forward output contains `target` for this layer (hook fallback only)."""
        raise ModelError(f"{type(self).__name__} has no projection hook for {target!r}; use capture() (the cache path)")

    def _split(self, out: torch.Tensor, target: str) -> torch.Tensor:
        """That submodule's output (B, T, *) -> the target (B, H_kv, T, head_dim)."""
        return self._heads(out)

    @property
    def uses_cache(self) -> bool:
        """True when the model takes a transformers Cache (capture at `cache.update`)."""
        from kvsplice.capture import _cache_arg

        return _cache_arg(self.model.forward) is not None

    def layout(self) -> dict[str, int]:
        return {
            "num_layers": self.num_layers,
            "num_q_heads": self.num_q_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
        }

    def check_layers(self, layers: Sequence[int] | None) -> list[int]:
        if layers is None:
            return list(range(self.num_layers))
        out = sorted(set(int(i) for i in layers))
        bad = [i for i in out if not 0 <= i < self.num_layers]
        if bad or not out:
            raise ModelError(f"layers must be a non-empty subset of 0..{self.num_layers - 1}, got {list(layers)}")
        return out

    @contextlib.contextmanager
    def capture(
        self, target: str = "v", sink: Sink | None = None, layers: Sequence[int] | None = None
    ) -> Iterator[Capture]:
        """Capture V (or pre-RoPE K) of `layers` (default all); yields a `Capture`.

        Every forward pushes detached tensors (B, H_kv, T, head_dim) in the model's dtype and device,
        taken where the cache receives them (module docstring); K with the rotary embedding undone.
        Hooks are removed on exit, also when the block raises."""
        if target not in TARGETS:
            raise ModelError(f"capture target must be one of {TARGETS}, got {target!r}")
        if not self.uses_cache:
            if target == "k_post":
                raise ModelError(f"{type(self.model).__name__} passes no transformers Cache: post-RoPE K cannot be captured where a cache would receive it")
            with self.capture_hooks(target, sink, layers) as cap:
                yield cap
            return
        from kvsplice.capture import capture_kv

        cap = Capture(target, sink)
        H, D = self.num_kv_heads, self.head_dim

        def on_kv(rec) -> None:
            x = rec.keys_pre_rope if target == "k" else rec.keys if target == "k_post" else rec.values
            if x.dim() != 4 or (x.shape[1], x.shape[3]) != (H, D):
                raise ModelError(f"layer {rec.layer}: expected cached {target.upper()} of shape (B, {H}, T, {D}), found {tuple(x.shape)}")
            cap.sink(rec.layer, x)

        with capture_kv(self.model, self.attention_modules(), on_kv, self.check_layers(layers)):
            yield cap

    @contextlib.contextmanager
    def capture_hooks(
        self, target: str = "v", sink: Sink | None = None, layers: Sequence[int] | None = None
    ) -> Iterator[Capture]:
        """The projection-hook capture (`_hook_module` output split into heads): for models without a
        transformers Cache. K is the projection output (no norm, no RoPE)."""
        if target not in TARGETS or target == "k_post":
            raise ModelError(f"projection-hook capture target must be 'v' or 'k' (before RoPE), got {target!r}")
        cap = Capture(target, sink)
        handles = []
        try:
            for i in self.check_layers(layers):
                handles.append(self._hook_module(i, target).register_forward_hook(self._make_hook(i, target, cap)))
            yield cap
        finally:
            for h in handles:
                h.remove()

    def _make_hook(self, layer_idx: int, target: str, cap: Capture):
        def hook(module: nn.Module, args, out: torch.Tensor) -> None:
            cap.sink(layer_idx, self._split(out.detach(), target))

        return hook

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, H_kv * head_dim) -> (B, H_kv, T, head_dim)."""
        B, T, C = x.shape
        if C != self.num_kv_heads * self.head_dim:
            raise ModelError(
                f"{type(self).__name__}: expected projection width {self.num_kv_heads}*{self.head_dim}, found {C}"
            )
        return x.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)


def find_attr(model: nn.Module, paths: Sequence[str]):
    """First attribute path (dotted) that exists on model, else ModelError."""
    for path in paths:
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    raise ModelError(f"{type(model).__name__}: expected one of the submodules {list(paths)}, found none")
