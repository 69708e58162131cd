"""lite-ft: fine-tune language models (full, LoRA, QLoRA) on a laptop CPU or one consumer GPU."""
__version__ = "0.1.0"
