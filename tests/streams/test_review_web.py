"""The review page over HTTP: sign-in, CSRF, escaping, CSP, copies, verdicts (no browser).

The data is what the real handler publishes for base64 pickups, stored by the real sink
in embedded chDB; the verdict a POST produces is fed back through the sink.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import faust
import pytest
from aiohttp.test_utils import TestClient, TestServer

from processors.analytics.client import open_client
from processors.analytics.migrations import apply_migrations
from processors.analytics.reports import run_report
from processors.analytics.rows import COLUMNS, SinkRecord
from processors.analytics.sink import AnalyticsSink
from streams.codecs import Codecs
from streams.review_web import register_review_views
from streams.settings import Settings, Topics
from tests.processors.review.conftest import T0
from tests.support.publishing import RecordingPublisher
from tests.support.review_data import decided, evidence_answer, review_pickup

Client = TestClient[Any, Any]
PLANTED = "<script>alert('x')</script>"
PASSWORD = "correct horse battery"


async def load(sink: AnalyticsSink) -> None:
    pickups = [
        review_pickup(
            1,
            productname=f"Shirt {PLANTED}",
            pickupproductimage=["javascript:alert(1)", review_pickup(1)["pickupproductimage"][0]],
        ),
        review_pickup(2),
    ]
    outputs = {
        "req-00001": evidence_answer(f"Looks fine {PLANTED}"),
        "req-00002": evidence_answer("Torn.", "Reject", colour="No"),
    }
    codecs, topics = Codecs(), Topics()
    for offset, (topic, _key, value) in enumerate(await decided(pickups, outputs)):
        event = codecs.for_schema(topics.schema_of(topic)).decode(value)
        sink.add(SinkRecord(topic, 0, offset, event, T0 + offset))
    sink.flush()


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    """The suite's one chDB engine path and a client.

    See tests/processors/analytics/test_sink.py for why there is one path.
    """
    dsn = f"chdb://{tmp_path_factory.getbasetemp() / 'chdb-engine'}"
    client = open_client(dsn)
    apply_migrations(client)
    yield dsn, client
    client.close()


@pytest.fixture
def ch(engine: tuple[str, Any]) -> Any:
    client = engine[1]
    for table in COLUMNS:
        client.command(f"TRUNCATE TABLE {table}")
    return client


@pytest.fixture
async def site(
    tmp_path: Path, ch: Any, engine: tuple[str, Any]
) -> AsyncIterator[tuple[Client, RecordingPublisher, AnalyticsSink]]:
    sink = AnalyticsSink(engine[0])
    sink.setup()
    await load(sink)
    app = faust.App(
        f"test-review-{tmp_path.name}",
        broker="kafka://127.0.0.1:1",  # never contacted: only the web server runs
        datadir=str(tmp_path / "faust"),
        store="memory://",
    )
    settings = Settings.from_env(
        {"VS_REVIEW_USERS": f"alice:{PASSWORD}", "VS_WEB_TOKEN": "tok-123"}
    )
    publisher = RecordingPublisher()
    register_review_views(app, settings, publisher, lambda: ch)
    client: Client = TestClient(TestServer(await app.web.wsgi()))
    await client.start_server()
    yield client, publisher, sink
    await client.close()
    sink.close()


def hidden(html: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert match, f"no hidden field {name}"
    return match.group(1)


async def sign_in(client: Client) -> None:
    form = await (await client.get("/review/login")).text()
    response = await client.post(
        "/review/login",
        data={"user": "alice", "password": PASSWORD, "csrf": hidden(form, "csrf")},
        allow_redirects=False,
    )
    assert response.status == 303


async def test_every_page_refuses_an_unauthenticated_get(site: Any) -> None:
    client, _, _ = site
    for path in ("/review", "/review/decision/x", "/review/accuracy", "/review/image/" + "a" * 64):
        response = await client.get(path)
        assert response.status == 401, path
        assert "Shirt" not in await response.text()
    with_token = await client.get("/review", headers={"Authorization": "Bearer tok-123"})
    assert with_token.status == 200


async def test_sign_in_needs_the_password_and_the_login_csrf(site: Any) -> None:
    client, _, _ = site
    form = await (await client.get("/review/login")).text()
    no_csrf = await client.post("/review/login", data={"user": "alice", "password": PASSWORD})
    assert no_csrf.status == 403
    wrong = await client.post(
        "/review/login", data={"user": "alice", "password": "nope", "csrf": hidden(form, "csrf")}
    )
    assert wrong.status == 401
    await sign_in(client)
    assert (await client.get("/review")).status == 200


async def test_pages_escape_model_and_event_text_and_carry_a_strict_csp(site: Any) -> None:
    client, _, _ = site
    await sign_in(client)
    queue = await client.get("/review")
    assert queue.headers["Content-Security-Policy"].startswith("default-src 'none'")
    body = await queue.text()
    assert PLANTED not in body and "&lt;script&gt;" in body
    key = re.findall(r'href="/review/decision/([0-9a-f]+)"', body)
    assert len(key) == 2
    pages = []
    for k in key:
        page = await client.get(f"/review/decision/{k}")
        pages.append(await page.text())
        assert "<script" not in pages[-1] and "javascript:" not in pages[-1]
        assert "script-src" not in page.headers["Content-Security-Policy"]  # no script at all
    html = next(p for p in pages if "SHP-00001" in p)
    assert "Looks fine &lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html


async def test_the_queue_filters_and_the_decision_page_shows_both_photo_sets(site: Any) -> None:
    client, _, _ = site
    await sign_in(client)
    picks = await (await client.get("/review", params={"decision": "Not Pick"})).text()
    assert picks.count('href="/review/decision/') == 1 and "SHP-00002" in picks
    assert (await client.get("/review", params={"decision": "Maybe"})).status == 400
    key = re.search(r'href="/review/decision/([0-9a-f]+)"', picks).group(1)  # type: ignore[union-attr]
    html = await (await client.get(f"/review/decision/{key}")).text()
    images = re.findall(r'src="/review/image/([0-9a-f]{64})"', html)
    assert len(images) == 3  # one vendor copy, two pickup copies
    copy = await client.get(f"/review/image/{images[0]}")
    assert copy.status == 200 and copy.content_type == "image/jpeg"
    assert (await copy.read()).startswith(b"\xff\xd8")
    assert (await client.get("/review/image/" + "0" * 64)).status == 404


async def test_a_verdict_needs_a_session_and_the_csrf_token_and_reaches_the_reports(
    site: Any, ch: Any
) -> None:
    client, publisher, sink = site
    await client.get("/review/login")
    bare = await client.post("/review/decision/abc", data={"verdict": "agree"})
    assert bare.status == 401
    await sign_in(client)
    queue = await (await client.get("/review", params={"decision": "Not Pick"})).text()
    key = re.search(r'href="/review/decision/([0-9a-f]+)"', queue).group(1)  # type: ignore[union-attr]
    html = await (await client.get(f"/review/decision/{key}")).text()
    form = {
        "review_id": hidden(html, "review_id"),
        "verdict": "override",
        "answer_0": "wrong",
        "answer_1": "correct",
        "note": "label is <b>fine</b>",
    }
    refused = await client.post(f"/review/decision/{key}", data=form)
    assert refused.status == 403 and publisher.sent == []
    forged = await client.post(f"/review/decision/{key}", data={**form, "csrf": "0" * 64})
    assert forged.status == 403 and publisher.sent == []
    sent = await client.post(
        f"/review/decision/{key}",
        data={**form, "csrf": hidden(html, "csrf")},
        allow_redirects=False,
    )
    assert sent.status == 303
    ((topic, message_key, value),) = publisher.sent
    assert topic == "verification-review" and message_key == key.encode()
    event = Codecs().for_schema("verification-review").decode(value)
    assert event["reviewer"] == "alice" and event["reviewer_decision"] == "Pick"
    assert event["ai_decision"] == "Not Pick" and not event["agrees"]
    assert [(a["question_index"], a["correct"]) for a in event["answers"]] == [
        (0, False),
        (1, True),
    ]
    sink.add(SinkRecord(topic, 0, 0, event, T0))
    sink.flush()
    assert ch.query("SELECT reviewer, decision_key FROM reviews").result_rows == [("alice", key)]
    (overall,) = run_report(ch, "review_agreement", timedelta(days=3650)).as_dicts()
    assert (overall["reviewed"], overall["agreed"]) == (1, 0)
    accuracy = await client.get("/review/accuracy", params={"since": "3650d"})
    text = await accuracy.text()
    assert accuracy.status == 200 and "<svg" in text and "review_confusion_matrix" in text
    decision_page = await (await client.get(f"/review/decision/{key}")).text()
    assert "label is &lt;b&gt;fine&lt;/b&gt;" in decision_page
