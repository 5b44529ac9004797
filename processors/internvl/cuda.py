"""CUDA streams and events, created through `Any`: torch's constructors carry no types.

Only called where the device is CUDA; nothing here runs at import time.
"""

from __future__ import annotations

from typing import Any


def new_stream(device: Any) -> Any:
    """A new `torch.cuda.Stream` on `device`."""
    import torch

    constructor: Any = torch.cuda.Stream
    return constructor(device)


def new_event() -> Any:
    """A new `torch.cuda.Event` (timing off), to record on a stream and wait for."""
    import torch

    constructor: Any = torch.cuda.Event
    return constructor()
