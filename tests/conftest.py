"""Test configuration: tiny models run fastest on one thread (thread start-up dominates their ops)."""

import torch

torch.set_num_threads(1)
