"""The cyclic garbage collector held off while a start builds what it keeps."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No cyclic collection within (reference counts still free what is dropped): a start that
    builds 100,000 stores' objects had its collections walk them again and again (~0.37 s of a
    fleet manager's first read, ~0.09 s of the proxy master's preload; ``gc.callbacks``).  The
    collector is on again after it only if it was before."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
