"""tuneforge: fine-tune a pretrained language model on your own data."""

__version__ = "0.1.0"
