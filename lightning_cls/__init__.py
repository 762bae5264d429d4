"""Classification fine-tuning of pretrained language models on scientific text, with PyTorch Lightning."""

__version__ = "0.1.0"
