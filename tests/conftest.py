"""Test-wide settings: tiny models run fastest on one thread (no spinning, no oversubscription)."""

import torch

torch.set_num_threads(1)
