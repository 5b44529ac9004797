"""CUDA streams, events and graph capture.

Streams and events are created through `Any`: torch's constructors carry no types. Only
called where the device is CUDA; nothing here runs at import time.
"""

from __future__ import annotations

from collections.abc import Callable
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


def capture_graph(
    device: Any,
    run: Callable[[], object],
    *,
    pool: Any = None,
    reset: Callable[[], object] | None = None,
) -> Any:
    """`run` captured as a `torch.cuda.CUDAGraph` (in memory pool `pool`, if given).

    Two warm-up runs on a side stream first (kernel selection and workspaces happen
    outside the graph); `reset`, when given, runs before each warm-up and before the
    capture (to put counters the run advances back). Capture errors propagate.
    """
    import torch

    current = torch.cuda.current_stream(device)
    stream = new_stream(device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        for _ in range(2):
            if reset is not None:
                reset()
            run()
    current.wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    if reset is not None:
        reset()
    with torch.cuda.graph(graph, pool=pool):
        run()
    return graph
