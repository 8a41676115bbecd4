"""Rewrite passes, one file per method. Importing a pass registers its rules and method."""
from . import (adalora, boft, dora, fourierft, hra, ia3, ln_tuning, loha, lokr, lora,  # noqa: F401
               modules_to_save, oft, prefix, prompt, quantize, trainable_tokens, vera)
from . import road  # noqa: F401,E402
from . import psoft  # noqa: F401,E402
from . import osf  # noqa: F401,E402
from . import lily  # noqa: F401,E402
