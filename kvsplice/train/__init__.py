"""nanoGPT-sized GPT-2 training for the seed's ablation: reciprocal attention (ra.py), in-forward
V-only pruning (prune.py), KVSplice calibration inside training (calibration.py), learned low-rank
V compression (learned.py), the loop and checkpoints (trainer.py, checkpoint.py), the ablation
runner (ablation.py). Entry points: `kvsplice train`, `kvsplice ablate-train`.

    from kvsplice.train import TrainConfig, train, load_checkpoint, load_checkpoint_as_hf
"""

import importlib

# name -> submodule; resolved on first use (PEP 562) so that importing kvsplice.train.config (e.g. by
# `kvsplice --help`, which lists the training flags) does not import torch through the trainer
_LAZY = {
    "export_hf": "checkpoint", "load_checkpoint": "checkpoint", "load_checkpoint_as_hf": "checkpoint",
    "TrainConfig": "config", "from_toml": "config", "train": "trainer",
}

__all__ = ["TrainConfig", "export_hf", "from_toml", "load_checkpoint", "load_checkpoint_as_hf", "train"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"kvsplice.train.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'kvsplice.train' has no attribute {name!r}")
