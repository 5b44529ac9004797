"""Builders of realistic pickup and product events and valid model answers for tests."""

from __future__ import annotations

import base64
import io
import json
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
