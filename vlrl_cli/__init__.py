"""vlrl: reinforcement learning for vision-language models, from records to a drift diagnosis."""

__version__ = "0.1.0"
