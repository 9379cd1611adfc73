"""Suite-wide test settings.

Tests use one intra-op thread: their tensors are small, and on a 2-core machine shared with the
subprocesses some tests start, two spinning OpenMP threads per process make tiny ops up to 100x
slower. Results do not depend on it.
"""

import torch

torch.set_num_threads(1)
