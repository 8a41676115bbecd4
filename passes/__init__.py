"""Rewrite passes, one file per method. Importing a pass registers its rules and method."""
from . import adalora, dora, fourierft, ia3, ln_tuning, loha, lokr, lora, modules_to_save, prefix, prompt, quantize, vera  # noqa: F401
