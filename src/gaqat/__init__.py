"""gaqat: low-bit quantization-aware training that generalizes to unseen domains."""

__version__ = "0.1.0"
