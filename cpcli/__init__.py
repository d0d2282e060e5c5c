"""cpcli: real-time multimodal data collection across lab machines."""

__version__ = "0.1.0"
