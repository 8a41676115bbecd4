"""Rewrite passes, one file per method. Importing a pass registers its rules and method."""
from . import (adalora, boft, dora, fourierft, hra, ia3, ln_tuning, loha, lokr, lora,  # noqa: F401
               modules_to_save, oft, prefix, prompt, quantize, trainable_tokens, vera)
from . import beft  # noqa: E402,F401
from . import hira  # noqa: E402,F401
from . import shira  # noqa: E402,F401
from . import supertuning  # noqa: E402,F401
from . import miss  # noqa: F401,E402
from . import delora  # noqa: F401,E402
from . import gralora  # noqa: F401,E402
from . import c3a  # noqa: F401,E402
from . import pvera  # noqa: F401,E402
from . import glora  # noqa: F401,E402
from . import peanut  # noqa: F401,E402
from . import deft  # noqa: F401,E402
from . import vblora  # noqa: E402,F401
from . import randlora  # noqa: E402,F401
from . import unilora  # noqa: E402,F401
from . import tinylora  # noqa: E402,F401
from . import road  # noqa: F401,E402
from . import psoft  # noqa: F401,E402
from . import osf  # noqa: F401,E402
from . import lily  # noqa: F401,E402
from . import frod  # noqa: E402,F401
from . import waveft  # noqa: E402,F401
from . import adamss  # noqa: E402,F401
from . import adaption_prompt  # noqa: E402,F401
from . import cpt  # noqa: E402,F401
