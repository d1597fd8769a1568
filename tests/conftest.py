"""Test-wide settings.

The tests' models are tiny: with several intra-op threads, torch spends more time
coordinating them than computing, and on a loaded 2-core machine that slows single
operations down ten-fold or more. One thread keeps the suite fast and its timings stable.
"""

import torch

torch.set_num_threads(1)
