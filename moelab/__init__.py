"""moelab: a lab for training Mixture-of-Experts routers and balancing their load.

``moelab.MoELayer(moelab.MoEConfig(d_model=..., num_experts=..., top_k=..., d_expert=...))``
is a dropless softmax top-k SwiGLU MoE layer; ``layer(x).output`` has the shape of x.
Importing moelab changes nothing in the process (no environment variable, no thread count);
the ``moelab`` command turns on huge pages for torch's CPU buffers (``moelab.cli.main``).
"""

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
