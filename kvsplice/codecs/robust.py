"""`robust-pca-q`: pca-q made to hold on text unlike its calibration text (issue 10).

pca-q (kvsplice/codecs/transform.py) fixes three things on the calibration text: which rotated
coefficients get how many bits (water-filling on their calibration variances), each coefficient's
clip range (static, in absolute units after the per-token gain), and the mean. Out of domain the
energy moves between coefficients: coefficients given few bits saturate at their static clip and
coefficients given 0 bits carry energy that is simply lost. Two remedies, both optional, all bytes
counted inside `bits`:

  margin   allocation with a safety margin: water-filling runs on var_i + margin * mean(var), so
           a coefficient the calibration text barely used still gets bits when it carries some
           (0 = pca-q's allocation)
  adapt    per-token adaptive range on top of the static clip: a tuple of scale factors
           (a_0 < a_1 < ...); each vector is coded with clip_i * a_j for the j that gives the
           smallest squared error of ITS coefficients, and j is stored in one uint8 ("range",
           8 bits of side info per vector, subtracted from the code budget like the fp16 gain).
           None = the static clip only.

    y = ((x - mean) / g) @ R - ymean       as pca-q (gain g: fp16 per vector)
    j = argmin_j |y_kept - Q(y_kept; clip * a_j)|^2        per vector
    codes_i = Q_{b_i}(y_i; clip_i * a_j)

Decode: as pca-q with clip * a_j (not one affine map of the codes for every row: `affine_form` is
None, so coded attention decodes such rows the reference way).
Payload: {"codes": uint8 (..., code_bits/8), "gain": fp16 (..., 1), "range": uint8 (..., 1) with adapt}.
"""

from __future__ import annotations

import math

import torch

from kvsplice.codecs.base import register
from kvsplice.codecs.pca import fit_pca
from kvsplice.codecs.quant import MAX_BITS, fit_clip, gaussian_clip, midrise_codes, midrise_values, water_fill
from kvsplice.codecs.transform import GAIN_BITS, TransformQ
from kvsplice.codecs.packing import pack_fast
from kvsplice.errors import CodecError

RANGE_BITS = 8  # one uint8 range index per vector


@register
class RobustPCAQ(TransformQ):
    """params: those of pca-q, plus margin (float >= 0) and adapt (None or increasing positive
    scale factors, at most 256). See the module docstring."""

    name = "robust-pca-q"
    default_warp = "none"
    default_rotate = True

    def __init__(self, bits: float = 4.0, scale: str = "gain", clip: str | float = "fit", warp: str | None = None,
                 rotate: bool | None = None, warp_params: dict | None = None, margin: float = 0.0,
                 adapt: list | tuple | None = None) -> None:
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1e6:
            raise CodecError(f"{self.name}: margin must be a number >= 0, got {margin!r}")
        if adapt is not None:
            ok = isinstance(adapt, (list, tuple)) and 1 <= len(adapt) <= 256 and all(
                not isinstance(a, bool) and isinstance(a, (int, float)) and 0 < a < 1e3 for a in adapt) \
                and all(b > a for a, b in zip(adapt, adapt[1:]))
            if not ok:
                raise CodecError(f"{self.name}: adapt must be None or 1..256 increasing positive scale factors, got {adapt!r}")
        if scale != "gain" and adapt is not None:
            raise CodecError(f"{self.name}: adapt needs scale='gain' (ranges relative to the gain), got scale={scale!r}")
        super().__init__(bits=bits, scale=scale, clip=clip, warp=warp, rotate=rotate, warp_params=warp_params)
        self.margin = float(margin)
        self.adapt = None if adapt is None else tuple(float(a) for a in adapt)
        self.params.update(margin=self.margin, adapt=None if self.adapt is None else list(self.adapt))

    def code_bits(self, D: int) -> int:
        """Code bits per vector: `bits` * D minus the gain and (with adapt) the range index."""
        side = (GAIN_BITS if self.scale == "gain" else 0) + (RANGE_BITS if self.adapt is not None else 0)
        budget = int(math.floor((self.bits * D - side) / 8 + 1e-9)) * 8
        if budget <= 0:
            raise CodecError(f"{self.name}: bits={self.bits} leaves no code bits for D={D} after {side} bits of side info")
        return min(budget, MAX_BITS * D)

    def _fit_quantiser(self, z: torch.Tensor) -> None:
        """pca-q's fit with the allocation run on var + margin * mean(var)."""
        D = z.shape[1]
        budget = self.code_bits(D)
        self.mean = z.mean(0)
        u, _ = self._normalise(z - self.mean)
        self.rotation = fit_pca(u, D)[1] if self.rotate else torch.eye(D, dtype=z.dtype, device=z.device)
        y = u @ self.rotation
        self.ymean = y.mean(0)
        y = y - self.ymean
        var = y.pow(2).mean(0)
        alloc = water_fill(var + self.margin * var.mean(), budget).to(z.device)
        sigma = var.sqrt()
        if self.clip == "fit":
            clip = fit_clip(y[:: max(1, y.shape[0] // 8192)], alloc, sigma)
        elif self.clip == "gauss":
            clip = gaussian_clip(alloc) * sigma
        else:
            clip = torch.where(alloc > 0, float(self.clip) * sigma, torch.zeros_like(sigma))
        self.alloc, self.clip_abs, self._kept = alloc, clip, None
        self.info = {"code_bits": budget, "kept_coefficients": int((alloc > 0).sum()),
                     "bits_histogram": [int((alloc == b).sum()) for b in range(MAX_BITS + 1)]}

    # -- payload ---------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(..., D) -> {"codes": uint8 (..., code_bits/8), "gain": fp16 (..., 1)[, "range": uint8 (..., 1)]}."""
        if self.adapt is None:
            return super().encode(x)
        self._check_vectors(x, self.dim, "encode")
        z = self._premix(self.warp.forward(x.float()))
        u, g = self._normalise(z - self.mean.float())
        y = (u @ self.rotation.float() - self.ymean.float())[..., self.kept]  # (..., k)
        lay, clip, levels = self._encode_tables()
        best_err = best_j = None
        for j, a in enumerate(self.adapt):  # few candidates: a loop of (..., k) ops
            c = midrise_codes(y, clip * a, levels)
            err = (midrise_values(c, clip * a, levels) - y).pow(2).sum(-1)  # (...,)
            if best_err is None:
                best_err, best_j = err, torch.zeros_like(err, dtype=torch.long)
            else:
                better = err < best_err
                best_err, best_j = torch.where(better, err, best_err), torch.where(better, j, best_j)
        scale = torch.tensor(self.adapt, dtype=torch.float32, device=y.device)[best_j].unsqueeze(-1)  # (..., 1)
        codes = midrise_codes(y, clip * scale, levels)
        return {"codes": pack_fast(codes, lay), "gain": g, "range": best_j.to(torch.uint8).unsqueeze(-1)}

    def _coefficients(self, payload: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.adapt is None:
            return super()._coefficients(payload)
        if self.dim is None:
            raise CodecError(f"{self.name} codec is not fitted; call fit() or load a geometry file first")
        if "range" not in payload or "gain" not in payload:
            raise CodecError(f"{self.name}: payload needs 'gain' and 'range' entries (keys: {sorted(payload)})")
        from kvsplice.codecs.quant import unpack_codes

        j = payload["range"].long()
        if bool((j >= len(self.adapt)).any()):
            raise CodecError(f"{self.name}: payload range index >= {len(self.adapt)} (the number of adapt factors)")
        b = self.alloc[self.kept]
        codes = unpack_codes(payload["codes"], b.tolist())
        scale = torch.tensor(self.adapt, dtype=torch.float32, device=codes.device)[j]  # (..., 1)
        vals = midrise_values(codes, self.clip_abs[self.kept].float() * scale, (1 << b).float())
        y = self.ymean.float().expand(*codes.shape[:-1], self.dim).clone()
        y[..., self.kept] += vals
        return y * payload["gain"].float()

    def affine_form(self):
        """None with adapt (each row has its own range); pca-q's affine form otherwise."""
        return None if self.adapt is not None else super().affine_form()

    def payload_bytes_per_vector(self, dtype: torch.dtype = torch.float32) -> float:
        return super().payload_bytes_per_vector(dtype) + (RANGE_BITS // 8 if self.adapt is not None else 0)
