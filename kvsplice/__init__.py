"""kvsplice: calibrated KV-cache compression for Hugging Face transformers models."""

__version__ = "0.1.0"
