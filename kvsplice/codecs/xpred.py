"""Cross-layer prediction (issue 13 lever 2; the idea of AQUA-KV): layer l's K (pre-RoPE) or V, joint
over its KV heads, is predicted from layer l-1's DECODED rows of the same tokens by a calibrated
affine map, and only the residual is coded with pca-q:

    pred_l = [x̂_{l-1}, 1] @ W_l          W_l (D + 1, D), D = KV heads x head_dim; layer 0: W = 0
    payload_l = pca-q(x_l - pred_l)       x̂_l = pred_l + decode(payload_l)

Closed loop (DPCM): the encoder predicts from what the decoder will have, so the error of layer l is
its own residual's coding error, not a sum over layers. Measured before building it (docs calibration,
held-out window, 2 bits): the coding MSE falls to 0.45x (K) / 0.52x (V) of plain pca-q's.

`XPredPCAQ` is pca-q on the residual plus the state tensor `pred` (W_l) and the parameter `layer`.
The cross-layer link lives in `kvsplice.rows.LayerCodec` (encode / decode read the previous layer's
decoded rows from the cache's per-step chain, `TokenIndex.chains`). Calibration needs every layer's
rows on the SAME tokens, so it has its own fit (`fit_xpred_geometry`), sequential over layers.
Bytes: the payload is pca-q's at the same bits; the geometry grows by W_l, (D + 1) x D float32 per
layer and target, counted with the rest of the geometry.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from kvsplice.codecs.base import TensorSpec, register
from kvsplice.codecs.transform import TransformQ
from kvsplice.errors import CodecError

RIDGE = 1e-3  # relative ridge on the normal equations: W stays finite for nearly collinear channels


@register
class XPredPCAQ(TransformQ):
    """pca-q of the residual after cross-layer prediction. params: bits, layer (>= 0) + pca-q's."""

    name = "xpred-pca-q"

    def __init__(self, bits: float = 4.0, layer: int = 0, prev: int | None = None, **kwargs: Any) -> None:
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise CodecError(f"{self.name}: layer must be an int >= 0, got {layer!r}")
        prev = layer - 1 if prev is None else prev  # files written before `prev` existed: the layer below
        if isinstance(prev, bool) or not isinstance(prev, int) or not -1 <= prev < layer:
            raise CodecError(f"{self.name}: prev (the layer predicted from, -1: none) must be an int in [-1, {layer - 1}], got {prev!r}")
        if kwargs.get("warp", "none") != "none" or kwargs.get("rotate", True) is not True:
            raise CodecError(f"{self.name}: residuals are coded with pca-q (no warp, rotation on)")
        super().__init__(bits=bits, **kwargs)
        self.params["layer"] = self.layer = layer
        self.prev = prev
        if prev != layer - 1:  # only when it is not the default: files written before `prev` hash the same
            self.params["prev"] = prev
        self.pred: torch.Tensor | None = None  # (D + 1, D) float32

    def fit(self, x: torch.Tensor, metric: torch.Tensor | None = None) -> "XPredPCAQ":
        """x (N, D): the RESIDUALS x_l - pred_l (fit_xpred_geometry makes them); W is set after."""
        super().fit(x, metric)
        if self.pred is None or self.pred.shape != (x.shape[1] + 1, x.shape[1]):
            self.pred = torch.zeros(x.shape[1] + 1, x.shape[1])
        return self

    def predict(self, prev: torch.Tensor) -> torch.Tensor:
        """prev (..., D) decoded rows of layer - 1 -> prediction (..., D) float32."""
        W = self.pred.float()
        return prev.float() @ W[:-1] + W[-1]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().state_tensors(), "pred": self.pred}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if "pred" not in tensors:
            raise CodecError(f"{self.name} state is missing tensor 'pred'")
        super().load_state_tensors({k: v for k, v in tensors.items() if k != "pred"})
        D = self.mean.shape[0]
        if tuple(tensors["pred"].shape) != (D + 1, D):
            raise CodecError(f"{self.name} state: pred must be ({D + 1}, {D}), found {tuple(tensors['pred'].shape)}")
        self.pred = tensors["pred"]

    def state_spec(self) -> dict[str, TensorSpec]:
        D = int(self.dim)
        return {**super().state_spec(), "pred": TensorSpec((D + 1, D))}

    def check_state(self, tensors: dict[str, torch.Tensor]) -> None:
        super().check_state({k: v for k, v in tensors.items() if k != "pred"})
        if self.prev < 0 and bool(tensors["pred"].abs().sum() > 0):
            raise CodecError(f"{self.name} state: layer {self.layer} is predicted from no layer (prev -1), its pred must be zero")


def capture_all_layers(model: Any, tokenizer: Any, text: str, target: str, windows: int, seq_len: int,
                       progress: bool = False) -> dict[int, torch.Tensor]:
    """Every layer's `target` rows on the same tokens: `windows` windows of `seq_len` tokens (BOS first
    where the tokenizer adds one) -> {layer: (windows * (seq_len - 1), D) float32}, each window's first
    row dropped (the cache keeps it exact as the sink)."""
    from tqdm.auto import tqdm

    from kvsplice.calibrate import input_device
    from kvsplice.data import bos_id, tokenize, with_bos
    from kvsplice.data import windows as split_windows
    from kvsplice.errors import KVSpliceError
    from kvsplice.models import get_adapter

    ad = get_adapter(model)
    wins = split_windows(with_bos(tokenize(tokenizer, text), seq_len, bos_id(tokenizer)), seq_len)[:windows]
    if len(wins) < windows:
        raise KVSpliceError(f"cross-layer calibration: expected {windows} windows of {seq_len} tokens, the text gives {len(wins)}")
    got: dict[int, list[torch.Tensor]] = {}

    def sink(l: int, x: torch.Tensor) -> None:  # (B, H, T, D) -> (B * (T - 1), H * D)
        got.setdefault(l, []).append(x[:, :, 1:].permute(0, 2, 1, 3).reshape(-1, x.shape[1] * x.shape[3]).to("cpu", torch.float32))

    was = model.training
    model.eval()
    try:
        with ad.capture(target, sink=sink, layers=list(range(ad.num_layers))), torch.no_grad():
            for w in tqdm(wins, desc=f"cross-layer {target.upper()}", disable=not progress):
                model(input_ids=w[None].to(input_device(model)), use_cache=False)
    finally:
        model.train(was)
    return {l: torch.cat(v) for l, v in got.items()}


def predecessors(model: Any) -> list[int]:
    """Per layer, the layer it is predicted from (-1: none): the nearest lower layer of the same
    attention type. Plain models: l - 1. Hybrid ones (Gemma 3's sliding : global layers): a sliding
    layer reads the previous sliding layer and a global one the previous global one, because only
    layers of one type hold the same rows (a sliding layer drops what leaves its window)."""
    from kvsplice.cache import layer_windows, model_layout

    L = model_layout(model)[0]
    w = layer_windows(model) or [None] * L
    return [max((j for j in range(l) if w[j] == w[l]), default=-1) for l in range(L)]


def fit_xpred_geometry(model: Any, tokenizer: Any, text: str, target: str, codec_params: dict, windows: int = 4,
                       seq_len: int = 1024, meta: dict[str, str] | None = None,
                       log: Callable[[str], None] = lambda m: None, rows: dict[int, torch.Tensor] | None = None,
                       layer_bits: list[float] | None = None) -> Any:
    """Closed-loop sequential fit: for l = 0..L-1, W_l by ridge regression of x_l on the DECODED
    x̂_p of its predecessor p (`predecessors`: what the cache will have), then pca-q on the residual,
    then x̂_l = pred + its decode. rows: `capture_all_layers`' output when the caller already has it;
    layer_bits: per-layer bit widths (the sensitivity allocation) instead of codec_params["bits"].
    Each codec's info records its closed-loop coding error on these rows (`mse`, per value)."""
    from kvsplice.cache import model_layout
    from kvsplice.codecs import get_codec
    from kvsplice.errors import KVSpliceError
    from kvsplice.geometry import Geometry

    X = capture_all_layers(model, tokenizer, text, target, windows, seq_len) if rows is None else rows
    L, H, hd = model_layout(model)
    if layer_bits is not None and len(layer_bits) != L:
        raise KVSpliceError(f"cross-layer calibration: layer_bits needs one width per layer ({L}), got {len(layer_bits)}")
    prevs = predecessors(model)
    N, D = X[0].shape
    if N < 8 * (D + 1):  # each output's affine map has D + 1 weights: fewer rows over-fit it (the held-out error grows)
        import warnings

        from kvsplice.errors import KVSpliceWarning

        warnings.warn(f"cross-layer calibration: {N} rows for maps of {D + 1} x {D}; expected >= {8 * (D + 1)} "
                      f"(more windows or longer ones) or the maps over-fit the calibration text", KVSpliceWarning, stacklevel=2)
    codecs, decoded = {}, {}
    for l in range(L):
        x, p = X[l], prevs[l]
        params = {**codec_params, "layer": l, "prev": p, **({"bits": float(layer_bits[l])} if layer_bits is not None else {})}
        c = get_codec("xpred-pca-q", **params)
        if p < 0:
            pred = torch.zeros_like(x)
            W = torch.zeros(x.shape[1] + 1, x.shape[1])
        else:
            A = torch.cat([decoded[p], torch.ones(x.shape[0], 1)], 1).double()  # (N, D + 1)
            G = A.T @ A
            W = torch.linalg.solve(G + RIDGE * float(G.diagonal().mean()) * torch.eye(G.shape[0], dtype=G.dtype), A.T @ x.double()).float()
            pred = A.float() @ W
        c.fit(x - pred)
        c.pred = W
        decoded[l] = pred + c.decode(c.encode(x - pred))  # what the decoder reconstructs
        c.info["mse"] = float((decoded[l] - x).pow(2).mean())
        codecs[(l, -1)] = c
        log(f"cross-layer {target.upper()} layer {l} (from {p}): residual / signal variance "
            f"{float((x - pred).var(0).sum() / x.var(0).sum()):.3f}")
    info = {"target": target, "num_layers": str(L), "num_kv_heads": str(H), "head_dim": str(hd),
            "joint_heads": "true", "tokens": str(X[0].shape[0]), **(meta or {})}
    return Geometry(codecs=codecs, meta={k: str(v) for k, v in info.items()})
