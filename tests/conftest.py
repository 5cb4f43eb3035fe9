"""Test-wide settings: one torch thread (the tests' tensors are small; on a shared 2-core
machine a second thread mostly adds synchronisation stalls)."""

import torch

torch.set_num_threads(1)
