"""Codecs: one file per method, all behind `Codec` (base.py) and the `CODECS` registry.

Importing this package registers every built-in codec. A new codec is one new file plus one
import line here.
"""

from kvsplice.codecs.base import CODECS, Codec, codec_names, get_codec, register
from kvsplice.codecs import identity, pca, robust, rotated, spline_pca, transform, uniform, xpred  # noqa: F401  (registration)

__all__ = ["CODECS", "Codec", "codec_names", "get_codec", "register"]
