"""nanoGPT-sized GPT-2 training for the seed's ablation: reciprocal attention (ra.py), in-forward
V-only pruning (prune.py), KVSplice calibration inside training (calibration.py), learned low-rank
V compression (learned.py), the loop and checkpoints (trainer.py, checkpoint.py), the ablation
runner (ablation.py). Entry points: `kvsplice train`, `kvsplice ablate-train`.

    from kvsplice.train import TrainConfig, train, load_checkpoint, load_checkpoint_as_hf
"""

from kvsplice.train.checkpoint import export_hf, load_checkpoint, load_checkpoint_as_hf
from kvsplice.train.config import TrainConfig, from_toml
from kvsplice.train.trainer import train

__all__ = ["TrainConfig", "export_hf", "from_toml", "load_checkpoint", "load_checkpoint_as_hf", "train"]
