"""Training stages over transformers, TRL and peft: pretrain, and the shared setup."""
