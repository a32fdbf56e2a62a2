"""ssdopt: ship a trained PyTorch SSD detector as fast, audited inference engines."""

__version__ = "0.1.0"
