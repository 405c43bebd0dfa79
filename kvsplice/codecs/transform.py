"""Transform coders: compander -> (optional per-token gain) -> rotation -> water-filled uniform
quantisation, and the exact inverse with dequantisation.

    z = warp(x) [@ M^(1/2)]           (..., D)  per-dimension monotone compander (or identity);
                                                optional output metric M (fit(x, metric=M))
    zc = z - mean                     (..., D)
    g = rms(zc)  (fp16, stored)       (..., 1)  only with scale="gain" ("gain-shape" coding)
    y = (zc / g) @ R - ymean          (..., D)  R (D, D): full PCA rotation of the calibration data
    codes_i = Q_{b_i}(y_i; clip_i)    b_i bits by reverse water-filling on var(y_i); 0 = dropped

Budget: `bits` is the average number of bits per value INCLUDING the fp16 gain; the code bits
are floor((bits * D - 16) / 8) * 8, so payload bytes = budget / 8 + 2 exactly and never exceed
bits * D / 8. Rank truncation is the special case where the budget forces b_i = 0.
Decode: y_hat = dequantised codes (ymean for dropped ones) -> (y_hat @ R^T) * g + mean
[@ M^(-1/2)] -> warp^-1. Payload: {"codes": uint8 (..., code_bits / 8), "gain": fp16 (..., 1)}.

Registry names (one class, different defaults):
  "pca-q"          no warp, rotation          "spline-pca-q"  seed spline g, rotation
  "spline-q"       seed spline g, no rotation
  "qspline-pca-q" / "qspline-q": the seed's spline trained on this coder's quantisation error
  "bennett-pca-q" / "bennett-q": closed-form compander for quantisation (slope ~ p^(1/3))
"""

from __future__ import annotations

import math

import torch

from kvsplice import native
from kvsplice.codecs.base import Codec, TensorSpec, check_orthonormal_columns, register
from kvsplice.codecs.companders import WARPS, make_warp
from kvsplice.codecs.packing import Layout, layout, pack_fast, transposed_plan, unpack_fast_t
from kvsplice.codecs.pca import fit_pca
from kvsplice.codecs.quant import (
    MAX_BITS,
    check_bits_param,
    fit_clip,
    gaussian_clip,
    midrise_codes,
    midrise_values,
    packed_nbytes,
    unpack_codes,
    water_fill,
)
from kvsplice.errors import CodecError

SCALES = ("gain", "static")
GAIN_BITS = 16


class TransformQ(Codec):
    """params: bits (avg bits/value incl. side info), scale ("gain" | "static"),
    clip ("fit": per-coefficient MSE search on calibration data | "gauss": Gaussian-optimal per
    bit width | a number of sigmas), warp ("none" | "spline" | "qspline" | "bennett"), rotate (bool),
    warp_params (dict passed to the warp)."""

    name = "transform-q"
    default_warp = "none"
    default_rotate = True

    def __init__(self, bits: float = 4.0, scale: str = "gain", clip: str | float = "fit", warp: str | None = None,
                 rotate: bool | None = None, warp_params: dict | None = None) -> None:
        bits = check_bits_param(bits, self.name)
        warp = self.default_warp if warp is None else warp
        rotate = self.default_rotate if rotate is None else rotate
        if scale not in SCALES:
            raise CodecError(f"{self.name}: scale must be one of {SCALES}, got {scale!r}")
        if not (clip in ("fit", "gauss") or (isinstance(clip, (int, float)) and not isinstance(clip, bool) and clip > 0)):
            raise CodecError(f"{self.name}: clip must be 'fit', 'gauss' or a positive number of sigmas, got {clip!r}")
        if warp not in WARPS:
            raise CodecError(f"{self.name}: warp must be one of {sorted(WARPS)}, got {warp!r}")
        if not isinstance(rotate, bool):
            raise CodecError(f"{self.name}: rotate must be a bool, got {rotate!r}")
        super().__init__(bits=bits, scale=scale, clip=clip, warp=warp, rotate=rotate, warp_params=dict(warp_params or {}))
        self.bits, self.scale, self.clip, self.rotate = bits, scale, clip, rotate
        self.warp = make_warp(warp, **(warp_params or {}))
        self.mean = self.rotation = self.ymean = self.alloc = self.clip_abs = None
        self.pre = self.post = None  # (D, D) metric factors M^(1/2), M^(-1/2) when fitted with a metric
        self._kept: torch.Tensor | None = None

    # -- geometry ------------------------------------------------------------------------------------
    def code_bits(self, D: int) -> int:
        """Total code bits per vector for dimension D (multiple of 8, side info subtracted)."""
        side = GAIN_BITS if self.scale == "gain" else 0
        budget = int(math.floor((self.bits * D - side) / 8 + 1e-9)) * 8
        if budget <= 0:
            raise CodecError(f"{self.name}: bits={self.bits} leaves no code bits for D={D} after {side} bits of side info")
        return min(budget, MAX_BITS * D)

    def _normalise(self, zc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.scale != "gain":
            return zc, None
        g = zc.pow(2).mean(-1, keepdim=True).sqrt().clamp(1e-6, 65504.0).half()  # (..., 1) fp16
        return zc / g.float(), g

    def fit(self, x: torch.Tensor, metric: torch.Tensor | None = None) -> "TransformQ":
        """x: (N, D) calibration vectors. metric: optional (D, D) symmetric PSD matrix M; the coder
        then minimises the error e^T M e instead of |e|^2 (e.g. M = A^T A with A the output
        projection that V feeds, see `output_metric`): it codes z @ M^(1/2) and maps back with
        M^(-1/2) (eigenvalues floored at 1e-4 of the largest)."""
        x = self._check_fit_input(x, min_rows=8)
        N, D = x.shape
        self.code_bits(D)  # raises early when the budget is impossible
        self.pre = self.post = None
        if metric is not None:
            self.pre, self.post = metric_factors(metric, D, self.name)
        self.warp.fit(x, self)
        self._fit_quantiser(self._premix(self.warp.forward(x)))
        self.dim = D
        self.info.update(self.warp.info)
        self.info["metric"] = metric is not None
        return self

    def _premix(self, z: torch.Tensor) -> torch.Tensor:
        return z if self.pre is None else z @ self.pre.float()

    def _postmix(self, z: torch.Tensor) -> torch.Tensor:
        return z if self.post is None else z @ self.post.float()

    def _fit_quantiser(self, z: torch.Tensor) -> None:
        """Mean, rotation, allocation and clips from warped calibration vectors z (N, D)."""
        D = z.shape[1]
        budget = self.code_bits(D)
        self.mean = z.mean(0)
        u, _ = self._normalise(z - self.mean)
        self.rotation = fit_pca(u, D)[1] if self.rotate else torch.eye(D, dtype=z.dtype, device=z.device)  # (D, D)
        y = u @ self.rotation
        self.ymean = y.mean(0)
        y = y - self.ymean
        var = y.pow(2).mean(0)
        alloc = water_fill(var, budget).to(z.device)
        sigma = var.sqrt()
        if self.clip == "fit":
            clip = fit_clip(y[:: max(1, y.shape[0] // 8192)], alloc, sigma)  # subsample: speed
        elif self.clip == "gauss":
            clip = gaussian_clip(alloc) * sigma
        else:
            clip = torch.where(alloc > 0, float(self.clip) * sigma, torch.zeros_like(sigma))
        self.alloc, self.clip_abs, self._kept = alloc, clip, None
        self.info = {
            "code_bits": budget,
            "kept_coefficients": int((alloc > 0).sum()),
            "bits_histogram": [int((alloc == b).sum()) for b in range(MAX_BITS + 1)],
        }

    @property
    def kept(self) -> torch.Tensor:
        if self._kept is None or self._kept.device != self.alloc.device:
            self._kept = torch.nonzero(self.alloc > 0).flatten()
        return self._kept

    # -- payload -------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(..., D) -> {"codes": uint8 (..., code_bits/8)} (+ "gain": fp16 (..., 1))."""
        self._check_vectors(x, self.dim, "encode")
        z = self._premix(self.warp.forward(x.float()))
        u, g = self._normalise(z - self.mean.float())
        y = (u @ self.rotation.float() - self.ymean.float())[..., self.kept]  # (..., k)
        lay, clip, levels = self._encode_tables()
        qt = self._native_tables() if y.device.type == "cpu" else None
        if qt is not None:  # one C call: the same float32 operations, the same bytes (tests/test_native.py)
            out = {"codes": native.quant_pack(y.float(), qt)}
        else:
            codes = midrise_codes(y, clip, levels)  # in [0, levels - 1] by construction: pack unchecked
            out = {"codes": pack_fast(codes, lay)}
        if g is not None:
            out["gain"] = g
        return out

    def _encode_tables(self) -> tuple[Layout, torch.Tensor, torch.Tensor]:
        """(packing layout of the kept codes, clip (k,), levels (k,)), cached while alloc/clip are the same tensors."""
        key = (self.alloc, self.clip_abs)
        cached = getattr(self, "_enc", None)
        if cached is None or cached[0][0] is not key[0] or cached[0][1] is not key[1]:
            b = self.alloc[self.kept]
            cached = self._enc = (key, (layout(tuple(b.tolist()), b.device), self.clip_abs[self.kept].float(), (1 << b).float()))
        return cached[1]

    def _native_tables(self) -> "native.QuantTables | None":
        """The C quantise-and-pack tables (cached beside _encode_tables), None without the C kernels."""
        if not native.available():
            return None
        lay, clip, levels = self._encode_tables()
        cached = getattr(self, "_qt", None)
        if cached is None or cached[0] is not lay or cached[1] is not clip:
            cached = self._qt = (lay, clip, native.quant_tables(clip, levels, lay.on(torch.device("cpu"))))
        return cached[2]

    def _coefficients(self, payload: dict[str, torch.Tensor]) -> torch.Tensor:
        """payload -> dequantised rotated coefficients times gain, (..., D) float32."""
        if self.dim is None:
            raise CodecError(f"{self.name} codec is not fitted; call fit() or load a geometry file first")
        b = self.alloc[self.kept]
        codes = unpack_codes(payload["codes"], b.tolist())
        vals = midrise_values(codes, self.clip_abs[self.kept].float(), (1 << b).float())
        y = self.ymean.float().expand(*codes.shape[:-1], self.dim).clone()
        y[..., self.kept] += vals
        if self.scale == "gain":
            if "gain" not in payload:
                raise CodecError(f"{self.name}: payload has no 'gain' entry (keys: {sorted(payload)})")
            y = y * payload["gain"].float()
        return y

    def decode(self, payload: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """payload -> (..., D) in `dtype` (float32 unless told). Without a warp: one matmul on the
        stored codes (`affine_form`); with one: the reference path (coefficients, rotation, warp^-1)."""
        form = self.affine_form()
        if form is None:
            return self.decompress(self._coefficients(payload)).to(dtype)
        lay, _, b, mu = form
        codes_t = unpack_fast_t(self._codes_bytes(payload, lay), lay)  # (..., k, T), rows in plan order
        x = codes_t.transpose(-1, -2) @ self._affine[2] + b  # (..., T, D)
        return (x * self._gain(payload) + mu if self.scale == "gain" else x + mu).to(dtype)

    # -- affine form: decode as one matmul (also what kvsplice/coded_attention.py computes with) -------
    def affine_form(self) -> tuple[Layout, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Decode without a warp is affine in the stored codes c (..., k) (the codes of width > 0,
        as floats):  x = g * (c @ A + b) + mu,  g the payload's fp16 gain (1 with scale="static").
        Returns (packing layout, A (k, D), b (D,), mu (D,)) in float32, or None when the warp is not
        the identity. A = step_i * R[:, i]^T rows (i kept), b = (ymean + centre offsets) @ R^T,
        both times M^(-1/2) when fitted with a metric. Cached until the state tensors change."""
        if type(self.warp) is not WARPS["none"]:
            return None
        if self.dim is None:
            raise CodecError(f"{self.name} codec is not fitted; call fit() or load a geometry file first")
        key = (self.rotation, self.mean, self.ymean, self.alloc, self.clip_abs, self.post)
        cached = getattr(self, "_affine", None)
        if cached is not None and all(a is b for a, b in zip(cached[0], key)):
            return cached[1]
        kept, R = self.kept, self.rotation.float()
        bits = self.alloc[kept]
        clip = self.clip_abs[kept].float()
        step = 2 * clip / (1 << bits).float()  # midrise_values: -clip + (code + 0.5) * step
        off = torch.zeros_like(self.ymean, dtype=torch.float32)
        off[kept] = step / 2 - clip
        A = step[:, None] * R[:, kept].T  # (k, D)
        b = (self.ymean.float() + off) @ R.T  # (D,)
        mu = self.mean.float()
        if self.post is not None:
            P = self.post.float()
            A, b, mu = A @ P, b @ P, mu @ P
        lay = layout(tuple(bits.tolist()), A.device)
        form = (lay, A.contiguous(), b, mu)
        self._affine = (key, form, A[transposed_plan(lay).order.to(A.device)].contiguous())  # rows in unpack_fast_t order
        return form

    def _codes_bytes(self, payload: dict[str, torch.Tensor], lay: Layout) -> torch.Tensor:
        codes = payload.get("codes")
        if codes is None or codes.dtype != torch.uint8 or codes.shape[-1] != lay.nbytes:
            found = None if codes is None else f"{codes.dtype} (..., {codes.shape[-1]})"
            raise CodecError(f"{self.name}: payload 'codes' must be uint8 (..., {lay.nbytes}), found {found}")
        return codes

    def _gain(self, payload: dict[str, torch.Tensor]) -> torch.Tensor:
        if "gain" not in payload:
            raise CodecError(f"{self.name}: payload has no 'gain' entry (keys: {sorted(payload)})")
        return payload["gain"].float()

    def payload_bytes_per_vector(self, dtype: torch.dtype = torch.float32) -> float:
        """Exact: packed codes (+ 2 bytes of fp16 gain); independent of the cache dtype."""
        return float(packed_nbytes(self.alloc.tolist()) + (2 if self.scale == "gain" else 0))

    # -- latent view: dequantised coefficients in the rotated domain (gain applied) -------------------
    def compress(self, x: torch.Tensor) -> torch.Tensor:
        return self._coefficients(self.encode(x)).to(x.dtype)

    def decompress(self, z: torch.Tensor) -> torch.Tensor:
        self._check_vectors(z, self.dim, "decompress")
        zc = z.float() @ self.rotation.float().T
        return self.warp.inverse(self._postmix(zc + self.mean.float())).to(z.dtype)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {"mean": self.mean, "rotation": self.rotation, "ymean": self.ymean, "alloc": self.alloc, "clip": self.clip_abs}
        out.update({f"warp.{k}": v for k, v in self.warp.state_tensors().items()})
        if self.pre is not None:
            out.update(pre=self.pre, post=self.post)
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        try:
            self.mean, self.rotation, self.ymean = tensors["mean"], tensors["rotation"], tensors["ymean"]
            self.alloc, self.clip_abs = tensors["alloc"].long(), tensors["clip"]
        except KeyError as e:
            raise CodecError(f"{self.name} state is missing tensor {e}") from e
        self.pre, self.post = tensors.get("pre"), tensors.get("post")
        if (self.pre is None) != (self.post is None):
            raise CodecError(f"{self.name} state has only one of the metric tensors 'pre'/'post'")
        self.warp.load_state_tensors({k[5:]: v for k, v in tensors.items() if k.startswith("warp.")})
        D = self.mean.shape[0]
        if self.rotation.shape != (D, D) or self.alloc.shape != (D,) or self.clip_abs.shape != (D,):
            raise CodecError(f"{self.name} state shapes disagree with D={D}")
        if int(self.alloc.sum()) != self.code_bits(D):
            raise CodecError(f"{self.name}: stored allocation sums to {int(self.alloc.sum())} bits, params give {self.code_bits(D)}")
        self._kept = None

    def state_spec(self) -> dict[str, TensorSpec]:
        D = int(self.dim)
        spec = {"mean": TensorSpec((D,)), "rotation": TensorSpec((D, D), bound=1 + 1e-3), "ymean": TensorSpec((D,)),
                "alloc": TensorSpec((D,), kind="int", bound=MAX_BITS), "clip": TensorSpec((D,)),
                "pre": TensorSpec((D, D), optional=True), "post": TensorSpec((D, D), optional=True)}
        spec.update({f"warp.{k}": v for k, v in self.warp.state_spec(D).items()})
        return spec

    def check_state(self, tensors: dict[str, torch.Tensor]) -> None:
        check_orthonormal_columns(self.name, "rotation", tensors["rotation"])
        if bool((tensors["alloc"] < 0).any()) or bool((tensors["clip"] < 0).any()):
            raise CodecError(f"{self.name} state: alloc (bits) and clip must be >= 0")
        if ("pre" in tensors) != ("post" in tensors):
            raise CodecError(f"{self.name} state has only one of the metric tensors 'pre'/'post'")
        if "pre" in tensors:  # M^(1/2) @ M^(-1/2) = I, else decode does not invert encode
            err = float((tensors["pre"].double() @ tensors["post"].double() - torch.eye(int(self.dim), dtype=torch.float64, device=tensors["pre"].device)).abs().max())
            if not err <= 1e-2:
                raise CodecError(f"{self.name} state: metric factors pre @ post must be the identity, found max error {err:.3g}")
        self.warp.check_state({k[5:]: v for k, v in tensors.items() if k.startswith("warp.")}, self.name)

    @property
    def latent_dim(self) -> int:
        return int(self.dim)


def metric_factors(metric: torch.Tensor, D: int, name: str = "transform-q", floor: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """(D, D) symmetric PSD M -> (M^(1/2), M^(-1/2)), eigenvalues floored at floor * max (float32)."""
    if not isinstance(metric, torch.Tensor) or tuple(metric.shape) != (D, D) or not metric.is_floating_point():
        raise CodecError(f"{name}: metric must be a floating ({D}, {D}) tensor, got {getattr(metric, 'shape', type(metric))}")
    m = metric.double()
    if not bool(torch.isfinite(m).all()) or not torch.allclose(m, m.T, rtol=1e-4, atol=1e-6 * float(m.abs().max())):
        raise CodecError(f"{name}: metric must be finite and symmetric")
    ev, U = torch.linalg.eigh(m)
    if float(ev.max()) <= 0:
        raise CodecError(f"{name}: metric must have a positive eigenvalue")
    ev = ev.clamp_min(float(ev.max()) * floor)
    return ((U * ev.sqrt()) @ U.T).float(), ((U / ev.sqrt()) @ U.T).float()


def output_metric(o_proj_weight: torch.Tensor, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """Metric for V of one layer, joint over its KV heads: M = A^T A, A = W_o @ E, where E (H_q*hd,
    H_kv*hd) copies each KV head to the query heads that read it (grouped-query attention). Exact
    when the query heads of a group attend alike. o_proj_weight: (hidden, H_q*hd) -> (H_kv*hd, H_kv*hd)."""
    W = o_proj_weight.double()
    hq = W.shape[1] // head_dim
    if W.shape[1] != hq * head_dim or hq % num_kv_heads:
        raise CodecError(f"output_metric: o_proj input width {W.shape[1]} is not H_q*head_dim with H_q a multiple of {num_kv_heads}")
    group = hq // num_kv_heads
    Wh = W.reshape(W.shape[0], num_kv_heads, group, head_dim)  # (hidden, H_kv, group, hd)
    A = Wh.sum(2).reshape(W.shape[0], num_kv_heads * head_dim)  # (hidden, H_kv*hd)
    return (A.T @ A).float()


@register
class PCAQ(TransformQ):
    name = "pca-q"


@register
class SplinePCAQ(TransformQ):
    name = "spline-pca-q"
    default_warp = "spline"


@register
class SplineQ(TransformQ):
    name = "spline-q"
    default_warp = "spline"
    default_rotate = False


@register
class QSplinePCAQ(TransformQ):
    name = "qspline-pca-q"
    default_warp = "qspline"


@register
class QSplineQ(TransformQ):
    name = "qspline-q"
    default_warp = "qspline"
    default_rotate = False


@register
class BennettPCAQ(TransformQ):
    name = "bennett-pca-q"
    default_warp = "bennett"


@register
class BennettQ(TransformQ):
    name = "bennett-q"
    default_warp = "bennett"
    default_rotate = False
