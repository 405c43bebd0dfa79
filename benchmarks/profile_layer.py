"""Profile one decode step of ONE layer holding S coded rows (SmolLM2-135M shapes: 9 query heads, 3 KV
heads, head_dim 64, joint pca-q over the KV heads for K and V), before and after issue 12.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/profile_layer.py [--rows 1024] [--batch 1]
        [--threads 1 2] [--reps 9] [--json docs/results/profile_layer.json]

Codecs are fitted on random vectors with a decaying spectrum (timing does not depend on the fit).
"before" = the decode path of the previous release: bit-by-bit unpack (packing.unpack_reference),
dequantise + scatter into D coefficients, gain, rotation (T x D x D), RoPE on K, concatenation
with the new row, then attention over float K/V (sdpa, KV heads repeated for GQA).
"after" = per-code unpack, decode as one matmul (c @ A + b, K only: it is coded before RoPE), RoPE,
and the "kvsplice-coded" attention reading V's codes (and, option "K after RoPE", K's codes).
"DynamicCache" = the step of an uncompressed cache: concatenation of the new row, sdpa.
Times: wall median over reps (ms) with [min, max], and the median process CPU time (all threads:
less sensitive to a loaded machine); one process, threads set per block.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvsplice import native  # noqa: E402
from kvsplice.codecs import get_codec  # noqa: E402
from kvsplice.codecs.packing import unpack_fast, unpack_fast_t, unpack_reference  # noqa: E402
from kvsplice.codecs.quant import midrise_values  # noqa: E402
from kvsplice.coded_attention import AffineGroup, _scores, _weighted_values, affine_groups  # noqa: E402
from kvsplice.rows import LayerCodec  # noqa: E402

HQ, H, HD = 9, 3, 64


def _time(fn, reps: int) -> dict[str, float]:
    fn()  # warm-up
    t, c = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        t.append((time.perf_counter() - t0) * 1e3)
        c.append((time.process_time() - c0) * 1e3)
    return {"median_ms": statistics.median(t), "min_ms": min(t), "max_ms": max(t), "cpu_median_ms": statistics.median(c)}


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class _Coded:
    """Minimal stand-in for kvsplice.coded_attention.CodedRows (no sink): payload + raw rows."""

    def __init__(self, payload, raw, groups: list[AffineGroup]) -> None:
        self.payload, self.raw, self.groups = payload, raw, groups
        self.num_payload = payload["codes"].shape[2]
        self.num_rows = self.num_payload + raw.shape[2]
        self.num_heads = raw.shape[1]

    def codes(self, g):
        return unpack_fast_t(self.packed(g), g.lay, torch.float32), self.gain(g)

    def packed(self, g):
        return self.payload["codes"][:, g.slot]

    def gain(self, g):
        return self.payload["gain"][:, g.slot].float().transpose(1, 2)

    def gain_rows(self, g):
        return self.payload["gain"][:, g.slot, :, 0]

    def sink_index(self):
        return None

    def sink_span(self):
        return None

    sink_head = None


def profile(rows: int, batch: int, bits: float, reps: int) -> dict[str, dict[str, float]]:
    g = torch.Generator().manual_seed(0)
    D = H * HD
    spectrum = torch.logspace(0, -2, D)
    fit = lambda: get_codec("pca-q", bits=bits).fit(torch.randn(4096, D, generator=g) * spectrum.sqrt())  # noqa: E731
    kc, vc = LayerCodec([fit()], joint=True, num_heads=H), LayerCodec([fit()], joint=True, num_heads=H)
    x = lambda: torch.randn(batch, H, rows, HD, generator=g)  # noqa: E731
    kp, vp = kc.encode(x()), vc.encode(x())
    k_new, v_new = torch.randn(batch, H, 1, HD), torch.randn(batch, H, 1, HD)
    q = torch.randn(batch, HQ, 1, HD)
    pos = torch.arange(rows, dtype=torch.float32)
    inv = 1.0 / (10000 ** (torch.arange(0, HD, 2) / HD))
    ang = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)
    cos, sin = ang.cos(), ang.sin()  # (rows, HD)
    codec = kc.codecs[0]
    widths = tuple(codec.alloc.tolist())
    lay, A, b, mu = codec.affine_form()
    out: dict[str, dict[str, float]] = {}

    def old_coeffs(payload):  # the previous TransformQ._coefficients, bit-by-bit unpack
        bk = codec.alloc[codec.kept]
        codes = unpack_reference(payload["codes"][:, 0], widths)[..., codec.kept]
        vals = midrise_values(codes, codec.clip_abs[codec.kept].float(), (1 << bk).float())
        y = codec.ymean.float().expand(*codes.shape[:-1], D).clone()
        y[..., codec.kept] += vals
        return y * payload["gain"][:, 0].float()

    def old_decode(payload):
        y = old_coeffs(payload) @ codec.rotation.float().T + codec.mean.float()  # (B, T, D)
        return y.view(batch, rows, H, HD).transpose(1, 2)

    y_old = old_coeffs(kp)
    out["before: unpack (bit by bit)"] = _time(lambda: unpack_reference(kp["codes"][:, 0], widths), reps)
    out["before: dequantise + scatter + gain"] = _time(lambda: old_coeffs(kp), reps)
    out["before: rotation matmul (T x D x D)"] = _time(lambda: y_old @ codec.rotation.float().T, reps)
    k_dec = old_decode(kp)
    out["RoPE on decoded K"] = _time(lambda: _rope(k_dec, cos, sin), reps)
    out["cat decoded rows + new row (K and V)"] = _time(lambda: (torch.cat([k_dec, k_new], 2), torch.cat([k_dec, v_new], 2)), reps)
    kf, vf = torch.cat([k_dec, k_new], 2), torch.cat([k_dec, v_new], 2)
    sdpa = lambda k, v: nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1))  # noqa: E731
    out["sdpa over float K/V"] = _time(lambda: sdpa(kf, vf), reps)

    def before():
        k = _rope(old_decode(kp), cos, sin)
        v = old_decode(vp)
        return sdpa(torch.cat([k, k_new], 2), torch.cat([v, v_new], 2))

    out["before: TOTAL layer step"] = _time(before, reps)
    out["after: unpack (per code)"] = _time(lambda: unpack_fast(kp["codes"][:, 0], lay, torch.float32), reps)
    out["after: unpack (per code, transposed: attention's layout)"] = _time(lambda: unpack_fast_t(kp["codes"][:, 0], lay), reps)
    c = unpack_fast(kp["codes"][:, 0], lay, torch.float32)
    out["after: decode matmul c @ A + b (T x k x D)"] = _time(lambda: (c @ A + b) * kp["gain"][:, 0].float() + mu, reps)
    out["encode the new row (K and V)"] = _time(lambda: (kc.encode(k_new), vc.encode(v_new)), reps)
    fast = native.available()
    groups, kgroups = affine_groups(vc), affine_groups(kc)  # with the C kernels where they build
    torch_only = lambda gs: [dataclasses.replace(g, native=None, Aext=None) for g in gs]  # noqa: E731
    groups_t, kgroups_t = torch_only(groups), torch_only(kgroups)

    def after_pre_rope_k():
        k = _rope(kc.decode(kp), cos, sin)
        key = torch.cat([k, k_new], 2)
        qg = q.reshape(batch, H, 3, HD)
        p = torch.softmax(_scores(qg, key) * HD**-0.5, -1)
        return _weighted_values(p, _Coded(vp, v_new, groups))

    def after_post_rope_k():
        qg = q.reshape(batch, H, 3, HD)
        p = torch.softmax(_scores(qg, _Coded(kp, k_new, kgroups)) * HD**-0.5, -1)
        return _weighted_values(p, _Coded(vp, v_new, groups))

    tag = "C kernels" if fast else "C kernels UNAVAILABLE: torch"
    out[f"after: TOTAL, K coded before RoPE (decode K), V coded attention ({tag})"] = _time(after_pre_rope_k, reps)
    out[f"after: TOTAL, K coded after RoPE, K and V coded attention ({tag})"] = _time(after_post_rope_k, reps)
    groups, kgroups = groups_t, kgroups_t
    out["after: TOTAL, K coded before RoPE (decode K), V coded attention (torch ops)"] = _time(after_pre_rope_k, reps)
    out["after: TOTAL, K coded after RoPE, K and V coded attention (torch ops)"] = _time(after_post_rope_k, reps)
    kd, vd = torch.randn(batch, H, rows, HD), torch.randn(batch, H, rows, HD)
    out["DynamicCache: cat + sdpa"] = _time(lambda: sdpa(torch.cat([kd, k_new], 2), torch.cat([vd, v_new], 2)), reps)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--bits", type=float, nargs="+", default=[4.0, 2.0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    result = {"rows": args.rows, "batch": args.batch, "reps": args.reps, "load_avg_1min": os.getloadavg()[0], "runs": {}}
    with torch.no_grad():
        for threads in args.threads:
            torch.set_num_threads(threads)
            for bits in args.bits:
                key = f"pca-q {bits:g}-bit, {threads} thread(s)"
                r = profile(args.rows, args.batch, bits, args.reps)
                result["runs"][key] = r
                print(f"\n{key} (rows {args.rows}, batch {args.batch}; median ms [min, max] of {args.reps})")
                for name, t in r.items():
                    print(f"  {name:62s} {t['median_ms']:8.3f}  [{t['min_ms']:.3f}, {t['max_ms']:.3f}]  cpu {t['cpu_median_ms']:8.3f}")
    result["load_avg_1min_end"] = os.getloadavg()[0]
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, path)
        print(f"JSON -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
