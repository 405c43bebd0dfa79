"""Decode speed: tokens per second of one decode step for DynamicCache, KIVI, transformers'
QuantizedCache and our pca-q caches, at several contexts / batch sizes / thread counts, in the same run;
with the peak extra memory of a decode step beside it.

    nice -n 10 .venv/bin/python benchmarks/decode_speed.py [--quick] [--reps 5]
        [--json docs/results/decode_speed.json] [--png docs/results/decode_speed.png]

Grid: contexts 512 / 2048 / 8192 at batch 1 and 8 (default), or --quick: the goal-table settings
(batch 1 at 2048 and 8192, batch 8 at 4096); threads 1 and 2; float32; SmolLM2-135M.
Method (prefill is not what is measured, and an 8k x 8 CPU prefill per cache would take an hour):
  1. codecs: joint pca-q over the 3 KV heads, fitted per layer on one 2048-token forward of the
     evaluation text (pre-RoPE K and V from k_proj / v_proj hooks, post-RoPE K from the cache);
  2. each cache is filled with `context` synthetic rows per layer through `cache.update` (random
     normal rows with the real K/V scale; decode time does not depend on the values), in chunks;
  3. one untimed decode step, then `reps` timed steps (model forward of 1 token per sequence);
     tokens/s = batch / step time; median with [min, max]; ratio = median / DynamicCache's median
     in the same (setting, threads) block, caches interleaved rep by rep so load hits all alike.
Memory: RSS sampled every 2 ms in a thread during the timed steps; "step_peak_mb" = peak RSS minus
RSS before the steps (transient buffers of a step: one layer's decoded rows, logits...);
"cache_mb" = RSS after the fill minus before it (what the cache holds). GPU: not measured.
--malloc mmap (for the memory columns) sets glibc's MALLOC_MMAP_THRESHOLD_=65536 so RSS follows every
large allocation and free; it also makes each step's fresh large tensors (DynamicCache's torch.cat of
its K/V, ours too) page-fault in, which slows every cache: tokens/s for the speed table come from
--malloc default (glibc's own policy, what a user runs), memory from --malloc mmap.
Caches "coded" run the "kvsplice-coded" attention (kvsplice/coded_attention.py) through the C kernels
(kvsplice/native; "torch ops": the same attention with the pure-torch unpack + matmuls, as before the
kernels); "reference" is the same codecs read by decoding every row then the model's sdpa (the path
before issue 12).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUICK = [(2048, 1), (8192, 1), (4096, 8)]
FULL = [(c, b) for b in (1, 8) for c in (512, 2048, 8192)]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _PeakRSS:
    """Samples RSS every 2 ms in a thread; .peak after stop()."""

    def __enter__(self) -> "_PeakRSS":
        self.peak, self._stop = _rss_mb(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_mb())


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fit_codecs(model, tokenizer, bits_list: list[float]) -> dict:
    """{bits: {"v": [...], "k_pre": [...], "k_post": [...]}} joint pca-q LayerCodecs per layer."""
    from transformers import DynamicCache

    from kvsplice.cache import LayerCodec, model_layout
    from kvsplice.codecs import get_codec
    from kvsplice.data import evaluation_text, tokenize
    from kvsplice.kcodec import PreRopeLayerCodec
    from kvsplice.rope import layer_rotary

    L, H, hd = model_layout(model)
    ids = tokenize(tokenizer, evaluation_text())[:2048][None]
    got: dict[str, list] = {"k_pre": [None] * L, "v": [None] * L}
    hooks = []
    for l, layer in enumerate(model.model.layers):
        for name, key in (("k_proj", "k_pre"), ("v_proj", "v")):
            def hook(mod, inp, out, l=l, key=key):
                got[key][l] = out[0].detach().float()  # (T, H * hd): concatenated heads = joint vector
            hooks.append(getattr(layer.self_attn, name).register_forward_hook(hook))
    cache = DynamicCache()
    with torch.no_grad():
        model(ids, past_key_values=cache)
    for h in hooks:
        h.remove()
    got["k_post"] = [cache.layers[l].keys[0].transpose(0, 1).reshape(-1, H * hd).float() for l in range(L)]
    shared: dict = {}
    out = {}
    for bits in bits_list:
        fit = lambda x: LayerCodec([get_codec("pca-q", bits=bits).fit(x)], joint=True, num_heads=H)  # noqa: E731
        out[bits] = {"v": [fit(x) for x in got["v"]], "k_post": [fit(x) for x in got["k_post"]],
                     "k_pre": [PreRopeLayerCodec(fit(x), layer_rotary(model, l, shared)) for l, x in enumerate(got["k_pre"])]}
    scale = {"k": float(torch.cat(got["k_post"]).std()), "v": float(torch.cat(got["v"]).std())}
    return out, scale


@contextlib.contextmanager
def _without_native():
    """The C kernels switched off (kvsplice.native.available() -> False) for one step: a cache first
    read in here caches torch-only attention groups, and its encode runs the torch ops."""
    from kvsplice import native

    real = native.available
    native.available = lambda: False
    try:
        yield
    finally:
        native.available = real


def cache_makers(model, codecs: dict, quick: bool) -> dict:
    """name -> (factory, coded: bool)."""
    from transformers import DynamicCache

    from kvsplice.cache import CompressedCache, model_layout
    from kvsplice.peers import get_peer

    L = model_layout(model)[0]
    makers = {"DynamicCache": (DynamicCache, False), "KIVI 2-bit": (get_peer("kivi", bits=2).cache_factory(model), False)}
    try:
        makers["QuantizedCache quanto 2-bit"] = (get_peer("hf-quantized", backend="quanto", bits=2, residual=32).cache_factory(model), False)
    except Exception as e:  # noqa: BLE001 - backend missing: say so in the output
        print(f"skipping transformers QuantizedCache: {type(e).__name__}: {e}", file=sys.stderr)
    for bits, c in codecs.items():
        mk = lambda k, v=c["v"]: (lambda: CompressedCache(L, v_codecs=v, k_codecs=k, sink=1))  # noqa: E731
        makers[f"pca-q {bits:g}-bit sink=1 coded, K after RoPE"] = (mk(c["k_post"]), True)
        if bits == 4.0:
            makers[f"pca-q {bits:g}-bit sink=1 coded, K after RoPE (torch ops)"] = (mk(c["k_post"]), True)
        if bits == 4.0 or not quick:
            makers[f"pca-q {bits:g}-bit sink=1 coded V, K before RoPE"] = (mk(c["k_pre"]), True)
            makers[f"pca-q {bits:g}-bit sink=1 reference (decode + sdpa), K before RoPE"] = (mk(c["k_pre"]), False)
    return makers


def fill(model, cache, context: int, batch: int, scale: dict, chunk: int = 512) -> None:
    from kvsplice.cache import model_layout

    L, H, hd = model_layout(model)
    g = torch.Generator().manual_seed(0)
    for start in range(0, context, chunk):
        n = min(chunk, context - start)
        pos = torch.arange(start, start + n)[None].expand(batch, n)
        for l in range(L):
            k = torch.randn(batch, H, n, hd, generator=g) * scale["k"]
            v = torch.randn(batch, H, n, hd, generator=g) * scale["v"]
            cache.update(k, v, l, kwargs={"position_ids": pos})


def run_block(model, makers: dict, context: int, batch: int, reps: int, scale: dict) -> dict:
    from kvsplice.coded_attention import coded_attention

    caches, base = {}, {}
    for name, (make, coded) in makers.items():
        r0 = _rss_mb()
        caches[name] = make()
        fill(model, caches[name], context, batch, scale)
        base[name] = {"cache_mb": _rss_mb() - r0}
        _log(f"filled {name}: {context} x {batch}")
    tok = torch.full((batch, 1), 42)
    times: dict[str, list[float]] = {n: [] for n in makers}
    peaks: dict[str, float] = {n: 0.0 for n in makers}

    def step(name: str, i: int) -> float:
        coded = makers[name][1]
        switch = coded_attention(model, caches[name]) if coded else None
        plain = _without_native() if "(torch ops)" in name else contextlib.nullcontext()
        try:
            with plain:
                pos = torch.full((batch, 1), context + i)
                t0 = time.perf_counter()
                model(tok, past_key_values=caches[name], position_ids=pos, use_cache=True)
                return time.perf_counter() - t0
        finally:
            if switch is not None:
                switch.restore()

    with torch.no_grad():
        for name in makers:
            step(name, 0)  # warm-up
        for i in range(1, reps + 1):  # interleaved: every cache sees the same load, rep by rep
            for name in makers:
                r0 = _rss_mb()
                with _PeakRSS() as m:
                    times[name].append(step(name, i))
                peaks[name] = max(peaks[name], m.peak - r0)
    out = {}
    for name, t in times.items():
        tps = [batch / x for x in t]
        out[name] = {"tokens_per_s": statistics.median(tps), "min": min(tps), "max": max(tps),
                     "step_peak_mb": round(peaks[name], 1), **base[name]}
    dyn = out["DynamicCache"]["tokens_per_s"]
    for r in out.values():
        r["ratio_to_dynamic"] = r["tokens_per_s"] / dyn
    del caches
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = list(result["blocks"])
    names = list(result["blocks"][blocks[0]])
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(blocks)) + 3.5, 5))
    w = 0.8 / len(names)
    for i, n in enumerate(names):
        ys = [result["blocks"][b][n]["ratio_to_dynamic"] for b in blocks]
        ax.bar([j + i * w for j in range(len(blocks))], ys, w, label=n)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(blocks))], blocks, rotation=20, fontsize=8)
    ax.set_ylabel("decode tokens/s / DynamicCache (same run)")
    ax.set_title(f"decode speed, {result['model']}, float32 CPU (shared machine; ratios only)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside the bars
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    os.chmod(tmp, 0o644)
    plt.close(fig)
    os.replace(tmp, path)


def _write_json(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def native_status() -> str:
    from kvsplice import native

    return f"built: {native.library_path().name} ({' '.join(native.FLAGS)})" if native.available() else "unavailable: torch path"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quick", action="store_true", help="only the goal-table settings")
    ap.add_argument("--settings", default=None, help="override: CONTEXTxBATCH,... e.g. 512x1,2048x8")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--bits", type=float, nargs="+", default=[4.0, 2.0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default="docs/results/decode_speed.json")
    ap.add_argument("--png", default="docs/results/decode_speed.png")
    ap.add_argument("--malloc", choices=("default", "mmap"), default="default",
                    help="default: glibc's policy (speed); mmap: MALLOC_MMAP_THRESHOLD_=65536 so RSS tracks frees (memory)")
    args = ap.parse_args(argv)
    if args.malloc == "mmap" and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and argv is None:
        # glibc raises its mmap threshold after frees, so freed buffers stay in the heap and RSS hides
        # them; a fixed threshold makes every large tensor an mmap, so RSS follows allocation and free
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    if args.reps < 5:
        ap.error("--reps must be >= 5 (median with spread)")
    settings = QUICK if args.quick else FULL
    if args.settings:
        settings = [tuple(int(v) for v in s.split("x")) for s in args.settings.split(",")]
    from kvsplice.loading import load_model, model_id

    t0 = time.perf_counter()
    torch.set_num_threads(min(args.threads))  # fitting: never more threads than measured with
    model, tokenizer = load_model(args.model)
    model.float()
    codecs, scale = fit_codecs(model, tokenizer, args.bits)
    _log("codecs fitted")
    makers = cache_makers(model, codecs, args.quick)
    result = {"model": model_id(model), "dtype": "float32", "gpu": "not measured (no GPU lent)",
              "config": {"settings": settings, "threads": args.threads, "reps": args.reps, "bits": args.bits,
                         "quick": args.quick, "fill": "synthetic rows via cache.update", "timing": "one decode step per rep",
                         "native_kernels": native_status(), "malloc": args.malloc,
                         "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_")},
              "load_avg_start": os.getloadavg(), "blocks": {}}
    path = Path(args.json)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for context, batch in settings:
            key = f"ctx {context} batch {batch} threads {threads}"
            res = run_block(model, makers, context, batch, args.reps, scale)
            result["blocks"][key] = res
            result["load_avg_end"], result["seconds"] = os.getloadavg(), round(time.perf_counter() - t0, 1)
            _write_json(result, path)  # partial results survive an interrupted run
            print(f"\n{key} (load {os.getloadavg()[0]:.1f})", flush=True)
            for n, r in res.items():
                print(f"  {n:58s} {r['tokens_per_s']:8.2f} tok/s [{r['min']:.2f}, {r['max']:.2f}]  "
                      f"x{r['ratio_to_dynamic']:.2f}  step peak +{r['step_peak_mb']:.0f} MB  cache {r['cache_mb']:.0f} MB",
                      flush=True)
            if args.png:
                plot(result, Path(args.png))
    print(f"JSON -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
