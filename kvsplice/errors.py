"""Typed errors raised on bad input. Every message names what was expected and what was found."""


class KVSpliceError(ValueError):
    """Base class for kvsplice input errors."""


class CodecError(KVSpliceError):
    """Bad input to a codec (shape, rank, non-finite values, unfitted codec...)."""


class GeometryError(KVSpliceError):
    """A geometry file is missing, corrupted, truncated, of another version, or does not match the model."""


class ModelError(KVSpliceError):
    """A model architecture or checkpoint kvsplice cannot handle."""


class NonFiniteError(KVSpliceError):
    """A model produced NaN/inf logits (or a perplexity came out non-finite): never a silent "nan"."""


class KVSpliceWarning(UserWarning):
    """Something works but is probably not what was meant (e.g. a geometry from another model)."""
