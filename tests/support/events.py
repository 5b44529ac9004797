"""Builders of realistic pickup and product events and valid model answers for tests."""

from __future__ import annotations

import base64
import io
import json
import random
import socket
from typing import Any

from PIL import Image

QUESTIONS = [
    {
        "Type": "boolean",
        "Label": "Is the product colour blue?",
        "IsMandatory": True,
        "ValueToCheck": "Yes",
    },
    {
        "Type": "text",
        "Label": "Brand name on the label",
        "IsMandatory": True,
        "ValueToCheck": "Acme",
    },
    {
        "Type": "boolean",
        "Label": "Is the product damaged?",
        "IsMandatory": False,
        "ValueToCheck": "No",
    },
]


def tiny_png_b64(
    color: tuple[int, int, int] = (20, 60, 200), size: tuple[int, int] = (64, 48)
) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def pickup_event(n: int, *, vendor_urls: list[str] | None = None) -> dict[str, Any]:
    return {
        "event_id": f"evt-{n}",
        "occurred_at": 1_763_800_000_000 + n,
        "pickupproductimage": vendor_urls or [f"https://images.example.com/p{n}.jpg"],
        "skupickdone": [tiny_png_b64()],
        "productname": "Acme blue cotton T-shirt",
        "question": json.dumps(QUESTIONS),
        "shippingid": f"SHP-{n:05d}",
        "productid": f"P-{n % 17}",
        "uuid": f"req-{n:05d}",
        "previousuuid": None,
    }


def valid_answer(recommendation: str = "Accept", *, colour: str = "Yes") -> str:
    return json.dumps(
        {
            "image_analysis": {
                "pickup_images": "A blue T-shirt with an Acme label.",
                "vendor_image": "A blue Acme T-shirt.",
                "comparison": "Same product.",
            },
            "verification_results": [
                {
                    **QUESTIONS[0],
                    "Result": colour,
                    "Evidence": "The shirt is blue.",
                    "Confidence": 92,
                    "isRetakeImage": False,
                },
                {
                    **QUESTIONS[1],
                    "Result": "Acme",
                    "Evidence": "Label reads Acme.",
                    "Confidence": "88",
                    "isRetakeImage": "false",
                },
                {
                    **QUESTIONS[2],
                    "Result": "No",
                    "Evidence": "No tears or stains.",
                    "Confidence": 80,
                    "isRetakeImage": False,
                },
            ],
            "pickup_confidence": {
                "overall_score": 87,
                "confidence_factors": {
                    "image_quality": 90,
                    "attribute_visibility": 85,
                    "matching_confidence": 86,
                },
                "recommendation": recommendation,
            },
        }
    )


def product_event(
    n: int, *, title: str = "Men's cotton crew-neck tee", image: str | None = "png"
) -> dict[str, Any]:
    return {
        "event_id": f"prod-evt-{n}",
        "occurred_at": 1_763_800_000_000 + n,
        "product_id": f"PROD-{n:05d}",
        "title": title,
        "description": "Soft everyday T-shirt with short sleeves.",
        "image": tiny_png_b64((200, 30, 30), (28, 28)) if image == "png" else image,
        "top_k_tags": 3,
    }


LISTEN_PORTS = (20000, 32767)
"""Where `free_port` looks: below Linux's default ephemeral range (32768-60999)."""


def free_port() -> int:
    """A port free to listen on now, for a worker process that binds it a moment later.

    Not `bind(0)`: the kernel takes such a port from its ephemeral range, which it also
    gives to outgoing connections, so a Kafka client's connection can take the port
    before the worker binds it (seen in CI: "address already in use", the worker gone).
    Below that range only listeners bind. Tries random ports; `bind(0)` is the last resort.
    """
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randint(*LISTEN_PORTS)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
