"""The idempotency key rule: it identifies the request, never only the shipment."""

from __future__ import annotations

import hashlib
from typing import Any

from processors.analytics.rows import SinkRecord, rows_for
from processors.contracts import PICKUP_COMPLETED, PRODUCT_LISTED, Topics
from processors.records import (
    PickupRequest,
    ProductListing,
    input_key,
)
from streams.codecs import Codecs
from tests.support.events import pickup_event, tiny_png_b64


def legacy_pickup(**changes: Any) -> dict[str, Any]:
    """A request in the former service's format: no event id, no uuid."""
    event = pickup_event(1)
    del event["event_id"]
    event["uuid"] = None
    return {**event, **changes}


def key_of(event: dict[str, Any]) -> str:
    return PickupRequest.from_event(event).idempotency_key


def test_a_retake_of_the_same_shipment_gets_its_own_key() -> None:
    first = legacy_pickup()
    retake = legacy_pickup(
        skupickdone=[tiny_png_b64((200, 10, 10))], previousuuid=key_of(legacy_pickup())
    )
    assert first["shippingid"] == retake["shippingid"]
    assert key_of(first) != key_of(retake)
    # The derived request uuid follows the request too.
    assert PickupRequest.from_event(first).uuid != PickupRequest.from_event(retake).uuid


def test_every_part_of_the_request_counts_when_the_producer_sent_no_ids() -> None:
    base = key_of(legacy_pickup())
    assert key_of(legacy_pickup(previousuuid="req-00000")) != base
    assert key_of(legacy_pickup(skupickdone=[tiny_png_b64(), tiny_png_b64()])) != base
    assert key_of(legacy_pickup(productid="P-other")) != base
    # Not content: the clock, and empty values the Avro defaults fill in.
    assert key_of(legacy_pickup(occurred_at=5)) == base
    assert key_of(legacy_pickup(previousuuid="")) == base


def test_a_request_uuid_identifies_a_request_without_an_event_id() -> None:
    event = legacy_pickup(uuid="req-A")
    assert key_of(event) == key_of(legacy_pickup(uuid="req-A", occurred_at=99))
    assert key_of(event) != key_of(legacy_pickup(uuid="req-B"))
    assert key_of(event) != key_of(legacy_pickup())


def test_the_event_id_wins_and_keeps_the_released_key() -> None:
    event = pickup_event(7)
    key = key_of(event)
    assert key == key_of({**event, "uuid": "another", "skupickdone": [tiny_png_b64((1, 2, 3))]})
    # Same value as before this rule existed, so stored keys stay valid.
    released = hashlib.sha256(f"pickup-completed\x00{event['event_id']}".encode())
    assert key == released.hexdigest()[:32]


def test_a_redelivery_in_any_wire_format_gets_the_same_key() -> None:
    codec = Codecs().for_schema("pickup-completed")
    event = legacy_pickup()
    wire = [codec.encode(event), codec.encode_json(event), codec.encode_json(legacy_pickup())]
    keys = {key_of(codec.decode(data)) for data in wire}
    assert len(keys) == 1


def test_listings_follow_the_same_rule() -> None:
    listing = {
        "product_id": "PROD-1",
        "title": "Boot",
        "description": "Leather",
        "image": "https://images.example.com/a.jpg",
        "top_k_tags": 5,
    }
    key = ProductListing.from_event(listing).idempotency_key
    other_image = {**listing, "image": "https://images.example.com/b.jpg"}
    assert ProductListing.from_event(other_image).idempotency_key != key
    assert key == input_key(PRODUCT_LISTED, listing)
    with_id = {**listing, "event_id": "catalog:1"}
    assert ProductListing.from_event(with_id).idempotency_key == input_key(
        PRODUCT_LISTED, {"event_id": "catalog:1"}
    )


def test_renamed_topics_keep_the_key_the_worker_and_the_sink_agree_on() -> None:
    topics = Topics(pickup_completed="prod.pickups", product_listed="prod.listings")
    codec = Codecs().for_schema("pickup-completed")
    for event in (pickup_event(3), legacy_pickup()):
        decoded = codec.decode(codec.encode(event))
        rows = rows_for(SinkRecord("prod.pickups", 0, 1, decoded, 1_000), topics)
        assert not isinstance(rows, Exception) and isinstance(rows, dict), rows
        [row] = rows["pickup_requests"]
        assert row[2] == key_of(decoded) == input_key(PICKUP_COMPLETED, decoded)
