"""`identity`: stores V as it is. The uncompressed reference every cache test compares against."""

from __future__ import annotations

import torch

from kvsplice.codecs.base import Codec, register


@register
class Identity(Codec):
    name = "identity"

    def fit(self, x: torch.Tensor) -> "Identity":
        self.dim = self._check_fit_input(x, min_rows=1).shape[1]
        return self

    def compress(self, x: torch.Tensor) -> torch.Tensor:
        self._check_vectors(x, self.dim, "compress")
        return x

    def decompress(self, z: torch.Tensor) -> torch.Tensor:
        self._check_vectors(z, self.dim, "decompress")
        return z

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    @property
    def latent_dim(self) -> int:
        return int(self.dim)
