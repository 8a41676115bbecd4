"""Progress of long work (transform, from_pretrained, merging, export, checkpoint writes).

One public switch, the environment variable ``FXPEFT_PROGRESS``: ``0`` silences progress, ``1``
shows it even where stderr is not a terminal (a log file, a notebook); unset, it shows on a
terminal only. The outermost :func:`task` draws one tqdm bar on stderr; the code it runs names
each step with :func:`step` ("capturing", "lowering block 3/32", "writing model.safetensors"), and
nested tasks (transform inside from_pretrained) report into the outer bar. Without a bar both
cost one context-variable read.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from typing import Optional

_bar = contextvars.ContextVar("fxpeft_progress_bar", default=None)
_OFF, _ON = ("0", "false", "no", "off"), ("1", "true", "yes", "on")


def enabled() -> bool:
    """Whether a task shows progress: FXPEFT_PROGRESS if set, else whether stderr is a terminal."""
    setting = os.environ.get("FXPEFT_PROGRESS", "").strip().lower()
    if setting in _OFF or setting in _ON:
        return setting in _ON
    return sys.stderr.isatty()


@contextlib.contextmanager
def task(name: str):
    """Show ``name`` and its steps on stderr while the block (or, as a decorator, the function)
    runs; only the outermost task draws."""
    if _bar.get() is not None or not enabled():
        yield
        return
    from tqdm import tqdm

    bar = tqdm(desc=name, total=None, file=sys.stderr, leave=False, dynamic_ncols=True,
               bar_format="{desc} {bar}| [{elapsed}]")
    bar.fxpeft_task = name
    token = _bar.set(bar)
    try:
        yield
    finally:
        _bar.reset(token)
        bar.close()


def step(label: str, done: Optional[int] = None, total: Optional[int] = None) -> None:
    """Name the step now running; ``done``/``total`` fill the bar (block 3 of 32)."""
    bar = _bar.get()
    if bar is None:
        return
    bar.total = total
    bar.n = done or 0
    bar.set_description_str(f"{bar.fxpeft_task}: {label}", refresh=True)
