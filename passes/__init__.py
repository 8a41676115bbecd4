"""Rewrite passes, one file per method. Importing a pass registers its rules and method."""
from . import (adalora, boft, dora, fourierft, hra, ia3, ln_tuning, loha, lokr, lora,  # noqa: F401
               modules_to_save, oft, prefix, prompt, quantize, trainable_tokens, vera)
from . import beft  # noqa: E402,F401
from . import hira  # noqa: E402,F401
from . import shira  # noqa: E402,F401
from . import supertuning  # noqa: E402,F401
from . import frod  # noqa: E402,F401
from . import waveft  # noqa: E402,F401
from . import adamss  # noqa: E402,F401
