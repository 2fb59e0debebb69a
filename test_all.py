"""Every test of the project. `python test_all.py` runs them all (through pytest) and exits non-zero
on any failure. Tests run offline: they build a tiny DINOv2 from a config and write tiny toy datasets
with lerobot itself (sim.py), then load both through the same code paths a hub id would take."""
import os
import sys

# Offline and reproducible before anything imports huggingface or torch.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
HERE = os.path.dirname(os.path.abspath(__file__))

# ==== fixtures ====

# ==== sim ====

# ==== data ====

# ==== encoder ====

# ==== dynamics ====

# ==== shortcut ====

# ==== train ====

# ==== plan ====

# ==== decode ====

# ==== eval ====

# ==== bench ====

# ==== end ====

if __name__ == "__main__":
    sys.exit(pytest.main([os.path.abspath(__file__), "-q", "-p", "no:cacheprovider", *sys.argv[1:]]))
