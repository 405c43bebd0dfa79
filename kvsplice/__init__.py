"""kvsplice: calibrated KV-cache compression for Hugging Face transformers models.

    recipe = kvsplice.calibrate_recipe(model, tokenizer)      # the best measured recipe, K and V
    model.generate(**inputs, cache=recipe.cache(model))       # a fresh CompressedCache per call

Importing kvsplice loads neither torch nor transformers (see kvsplice/api.py).
"""

from kvsplice.api import PRESETS, Recipe, calibrate_recipe

__version__ = "0.1.0"
__all__ = ["PRESETS", "Recipe", "calibrate_recipe", "__version__"]
