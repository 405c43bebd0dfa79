"""kvsplice: calibrated KV-cache compression for Hugging Face transformers models.

    recipe = kvsplice.calibrate_recipe(model, tokenizer)      # the best measured recipe, K and V
    model.generate(**inputs, cache=recipe.cache(model))       # a fresh CompressedCache per call

    cache = recipe.cache(model)
    with kvsplice.coded_decode(model, cache):                 # faster decode: attention on the codes
        model.generate(**inputs, cache=cache)

Importing kvsplice loads neither torch nor transformers (see kvsplice/api.py).
"""

from kvsplice.api import PRESETS, Recipe, calibrate_recipe

__version__ = "0.1.0"
__all__ = ["PRESETS", "Recipe", "calibrate_recipe", "coded_decode", "__version__"]


def __getattr__(name: str):
    """`kvsplice.coded_decode` (= kvsplice.coded_attention.coded_attention) imports torch: loaded on first use."""
    if name == "coded_decode":
        from kvsplice.coded_attention import coded_attention

        return coded_attention
    raise AttributeError(f"module 'kvsplice' has no attribute {name!r}")
