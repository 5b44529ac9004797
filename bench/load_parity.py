"""The load benchmark's greedy-ids check: the slot engine against one-at-a-time `generate`.

`parity` runs on the benchmark's engines (`bench/bench_load.py --parity N`, best with
`--dtype float32`): requests are admitted at staggered times, so they join the running
decode at arbitrary steps, and each one's ids are compared with its own `generate`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any


def parity(
    make_engine: Any,
    pool: list[Any],
    count: int,
    tokens: int,
    seed: int,
    overrides: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Greedy ids of the slot engine (admissions spread over its steps) against `generate`.

    `overrides`: `SlotEngineConfig` settings of the slot engine (`--slot-variants`' first).
    """
    import random

    from processors.slot_engine import SlotEngine, SlotEngineConfig

    requests = [pool[index % len(pool)] for index in range(count)]
    reference = make_engine(
        decode="generate", max_batch_size=1, max_new_tokens=tokens, min_new_tokens=tokens
    )
    expected = [reference.generate_token_ids([request])[0] for request in requests]
    longest = max(len(ids) for ids in reference.encode_prompts(requests))
    config = SlotEngineConfig(
        slots=max(1, count - 1),  # one request waits for a slot
        context_length=-(-(longest + tokens + 64) // 128) * 128,
        stop_at_json_close=False,
    )
    changes: dict[str, Any] = dict(overrides or {})
    config = dataclasses.replace(config, **changes)
    slot = SlotEngine(make_engine(max_new_tokens=tokens, min_new_tokens=tokens), config)
    slot.load()
    pause = random.Random(seed)
    try:
        futures = []
        for request in requests:
            futures.append(slot.submit(request))
            time.sleep(pause.uniform(0.0, 0.05))
        got = [list(future.result().token_ids) for future in futures]
        scheduler = slot.scheduler
        mixed_steps = int(scheduler.stats["mixed_steps"]) if scheduler is not None else 0
    finally:
        slot.close()
    rows = []
    for a, b in zip(expected, got, strict=True):
        differs = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        rows.append({"identical": a == b, "first_difference": differs, "tokens": [len(a), len(b)]})
    return {
        "requests": count,
        "new_tokens": tokens,
        "overrides": overrides or {},
        "mixed_steps": mixed_steps,
        "rows": rows,
    }
