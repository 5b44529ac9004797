"""Realistic review data: pickups run through the real VerificationHandler (replay engine).

`decided()` returns every message the worker would publish for the given pickups
(decisions, attempts, review copies) plus the pickups themselves, as
(topic, key, encoded value) triples, ready for the sink or for a broker.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

from processors.gathering import GatherLimits
from processors.inference import ReplayEngine
from processors.review.images import CopyLimits, ReviewCopier
from processors.verification import VerificationPipeline
from streams.codecs import Codecs
from streams.handlers import RawMessage, VerificationHandler
from streams.metrics import Metrics
from streams.publishing import EventWriter
from streams.settings import Topics
from tests.support.events import QUESTIONS, pickup_event, tiny_png_b64, valid_answer
from tests.support.publishing import RecordingPublisher

Message = tuple[str, bytes | None, bytes]


def review_pickup(n: int, **fields: Any) -> dict[str, Any]:
    """A pickup whose vendor and pickup images are base64, so both get review copies."""
    return {
        **pickup_event(n),
        "pickupproductimage": [tiny_png_b64((20, 40, 200), (120, 90))],
        "skupickdone": [tiny_png_b64((200, 40, 20), (90, 120)), tiny_png_b64((9, 9, 9))],
        **fields,
    }


def sample_photo_b64(
    name: str, side: int = 280, tint: tuple[int, int, int] = (255, 255, 255)
) -> str:
    """A product photo from the in-repo sample set, scaled up and tinted, as base64 PNG."""
    from PIL import Image, ImageOps

    from streams.settings import SAMPLES_DIR

    grey = Image.open(SAMPLES_DIR / "categorization" / "images" / name).convert("L")
    photo = ImageOps.colorize(grey.resize((side, side)), black=(245, 245, 240), white=tint)
    buffer = io.BytesIO()
    photo.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def evidence_answer(evidence: str, recommendation: str = "Accept", colour: str = "Yes") -> str:
    """A valid model answer whose first question carries `evidence` (and answers `colour`)."""
    answer = json.loads(valid_answer(recommendation, colour=colour))
    answer["verification_results"][0]["Evidence"] = evidence
    return json.dumps(answer)


async def decided(
    pickups: list[dict[str, Any]], outputs: dict[str, str], topics: Topics | None = None
) -> list[Message]:
    """The pickups and everything the worker publishes for them (`outputs` by request uuid)."""
    topics = topics or Topics()
    codecs = Codecs()
    handler = VerificationHandler(
        VerificationPipeline(
            ReplayEngine({u: [t] for u, t in outputs.items()}, version="replay:test"),
            images=None,
            tiling=None,
        ),
        codecs,
        topics,
        16 * 1024 * 1024,
        Metrics(),
        copier=ReviewCopier(CopyLimits(), GatherLimits()),
    )
    encode = codecs.for_schema("pickup-completed").encode
    inputs: list[Message] = [
        (topics.pickup_completed, p["shippingid"].encode(), encode(p)) for p in pickups
    ]
    messages = [RawMessage(t, 0, n, k, v) for n, (t, k, v) in enumerate(inputs)]
    publisher = RecordingPublisher()
    writer = EventWriter(publisher, codecs, topics)
    await handler.handle(messages, writer)
    await writer.flush()
    return inputs + publisher.sent


__all__ = ["QUESTIONS", "decided", "evidence_answer", "review_pickup"]
