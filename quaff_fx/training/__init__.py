"""Fine-tuning with the Hugging Face Trainer: data (data.py), the training run (trainer.py), the adapter
folder and its reload (adapter.py)."""

from .adapter import load_adapter, save_adapter
from .data import build_examples, read_rows, split
from .trainer import TrainConfig, fit

__all__ = ["TrainConfig", "build_examples", "fit", "load_adapter", "read_rows", "save_adapter", "split"]
