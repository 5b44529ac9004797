"""CUDA streams, events and graph capture.

Streams and events are created through `Any`: torch's constructors carry no types. Only
called where the device is CUDA; nothing here runs at import time.
"""

from __future__ import annotations

import functools
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


@functools.cache
def green_stream(device: Any, sms: int) -> tuple[Any, Any]:
    """A CUDA green context of `sms` multiprocessors of `device` and a stream of it.

    Kernels queued on the stream run on those multiprocessors only; the rest of the
    device stays free for other streams. Returns (context, stream). One pair per
    (device, sms) for the whole process, never destroyed: torch's caching allocator
    keeps blocks and events of the stream after its users are gone, and on an H200
    (torch 2.11) destroying the context made later CUDA calls fail with "context is
    destroyed". Raises what torch raises where green contexts are not supported (older
    torch, driver or device); a failure is not cached.
    """
    import torch
    from torch.cuda import green_contexts

    index = torch.device(device).index or 0
    kind: Any = green_contexts.GreenContext
    try:
        context = kind(num_sms=sms, device_id=index)
    except TypeError:  # torch before 2.14: GreenContext.create(num_sms=, device_id=)
        context = kind.create(num_sms=sms, device_id=index)
    return context, context.Stream()


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
