"""eightbit: 8-bit optimizer state for PyTorch."""
__version__ = "0.1.0"
