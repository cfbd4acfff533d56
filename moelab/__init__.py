"""moelab: a lab for training Mixture-of-Experts routers and balancing their load."""

__version__ = "0.1.0"
