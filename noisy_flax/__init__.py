"""noisy_flax: NoisyNN noise injection for Flax ViTs and ResNets."""
__version__ = "0.1.0"
