"""Rewrite passes, one file per method. Importing a pass registers its rules and method."""
from . import adalora, boft, dora, hra, ia3, loha, lokr, lora, modules_to_save, oft, prefix, prompt, quantize, trainable_tokens  # noqa: F401
