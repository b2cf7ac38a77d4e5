"""Test configuration: tiny models run fastest on one thread (thread start-up dominates their ops).

Tests over about 10 s, and those that run an example, benchmark or soak script, are marked ``slow``: they run
by default (CI runs ``python -m pytest -q``); ``python -m pytest -m "not slow"`` is the fast local loop.
"""

import torch

torch.set_num_threads(1)
