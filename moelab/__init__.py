"""moelab: a lab for training Mixture-of-Experts routers and balancing their load.

``moelab.MoELayer(moelab.MoEConfig(d_model=..., num_experts=..., top_k=..., d_expert=...))``
is a dropless softmax top-k SwiGLU MoE layer; ``layer(x).output`` has the shape of x.
"""

import os

# PyTorch's CPU allocator backs buffers of 2 MiB and more with transparent huge pages when
# THP_MEM_ALLOC_ENABLE=1 (read at torch's first such allocation). A fresh 64 MiB buffer then
# costs ~20 ms of page faults instead of ~55 ms on a 2-core VM; MoE weight gradients are E/k
# times a dense layer's and fresh every step (docs/benchmarks.md). Set it to 0 to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from moelab.config import BalanceConfig, CapacityConfig, MoEConfig, RouterConfig
from moelab.moe import MoELayer, MoEOutput

__version__ = "0.1.0"

__all__ = [
    "BalanceConfig",
    "CapacityConfig",
    "MoEConfig",
    "MoELayer",
    "MoEOutput",
    "RouterConfig",
    "__version__",
]
