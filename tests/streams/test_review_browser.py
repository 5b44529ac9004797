"""The review loop in a real browser (Debian's chromium, driven by Playwright).

Real processes on the real broker: pickups → inference worker (replay engine) →
decisions and review copies → analytics sink (embedded ClickHouse), which serves the
review page. The browser signs in, filters the queue, opens a decision, sees both photo
sets, submits a verdict; the verdict comes back through Kafka into the `reviews` table
and the agreement report. Planted `<script>` text must render as text.

`VS_REVIEW_SCREENSHOTS=DIR` also saves the queue and decision pages as PNGs (how the
README's screenshots under docs/ are made).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from streams.codecs import Codecs
from streams.kafka_admin import ensure_topics, wait_for_lag_zero
from tests.conftest import WorkerProcess, streams_cli
from tests.streams.test_sink_broker import all_topics, sink_env
from tests.streams.test_worker_broker import worker_env
from tests.support.kafka_io import produce
from tests.support.review_data import evidence_answer, review_pickup, sample_photo_b64

if TYPE_CHECKING:
    from playwright.sync_api import Dialog, Page

pytestmark = pytest.mark.broker

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PLANTED = "<script>window.__planted = 1</script>"
PASSWORD = "browser-test-password"


def pickups() -> list[dict[str, Any]]:
    bag, shirt, boot = "train_00023.png", "train_00018.png", "train_00000.png"
    return [
        review_pickup(
            1,
            productname=f"Tan leather tote {PLANTED}",
            productid="BAG-TOTE-TAN",
            pickupproductimage=["javascript:alert(1)", sample_photo_b64(bag, tint=(150, 100, 60))],
            skupickdone=[
                sample_photo_b64(bag, tint=(140, 95, 55)),
                sample_photo_b64(bag, 200, tint=(110, 70, 40)),
            ],
        ),
        review_pickup(
            2,
            productname="Navy slim-fit shirt",
            productid="SHRT-NV-M",
            pickupproductimage=[sample_photo_b64(shirt, tint=(40, 50, 120))],
            skupickdone=[sample_photo_b64(shirt, tint=(120, 40, 40))],
        ),
        review_pickup(
            3,
            productname="Olive ankle boot",
            productid="BOOT-OLV",
            pickupproductimage=[sample_photo_b64(boot, tint=(90, 100, 50))],
            skupickdone=[sample_photo_b64(boot, tint=(90, 100, 50))],
        ),
    ]


def outputs() -> dict[str, list[str]]:
    return {
        "req-00001": [evidence_answer(f"A tan tote. {PLANTED}", "Reject", colour="No")],
        "req-00002": [evidence_answer("The pickup shirt is red, not navy.", "Reject", colour="No")],
        "req-00003": [evidence_answer("Same olive boot, no damage.")],
    }


def _dismissed(dialog: Dialog, seen: list[str]) -> None:
    seen.append(dialog.message)
    dialog.dismiss()


def _sign_in_and_filter(page: Page, base: str, shots: str | None) -> None:
    """Refused until signed in; the queue, then the model's Not Pick decisions only."""
    first = page.goto(f"{base}/review")
    assert first is not None and first.status == 401
    page.fill("input[name=user]", "reviewer")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_selector("table.queue")
    assert page.locator("table.queue tbody tr").count() == 3
    page.select_option("select[name=decision]", "Not Pick")
    page.click("form.filters button[type=submit]")
    page.wait_for_url("**decision=Not+Pick**")
    rows = page.locator("table.queue tbody tr")
    assert rows.count() == 2
    assert PLANTED in page.inner_text("table.queue")  # shown as text
    if shots:
        page.screenshot(path=str(Path(shots) / "review-queue.png"))


def _check_decision_page(page: Page, shots: str | None, dialogs: list[str]) -> None:
    """Both photo sets from the stored copies; planted markup stays text."""
    page.locator("table.queue tbody tr", has_text="SHP-00001").locator("a").click()
    page.wait_for_selector("#vendor-photos")
    for role, expected in (("vendor", 1), ("pickup", 2)):
        images = page.locator(f"#{role}-photos img")
        assert images.count() == expected, role
        for i in range(expected):
            assert images.nth(i).evaluate("img => img.complete && img.naturalWidth > 0")
            src = images.nth(i).get_attribute("src", timeout=1000)
            assert src is not None and src.startswith("/review/image/")
    html = page.content()
    assert "javascript:" not in html
    assert PLANTED in page.inner_text("td.evidence >> nth=0")
    assert page.evaluate("window.__planted") is None and dialogs == []
    if shots:
        page.screenshot(path=str(Path(shots) / "review-decision.png"), full_page=False)


def _submit_verdict(page: Page, base: str) -> None:
    """Override the model (Not Pick -> Pick), mark two answers, a note; it comes back."""
    page.check("input[name=answer_0][value=wrong]")
    page.check("input[name=answer_1][value=correct]")
    page.check("input[name=verdict][value=override]")
    page.fill("textarea[name=note]", "Colour is fine in daylight.")
    page.click("form.verdict button[type=submit]")
    page.wait_for_selector("p.saved")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and page.locator("p.reviewed").count() == 0:
        time.sleep(1)
        page.reload()
    assert "Pick by reviewer" in page.inner_text("p.reviewed")
    page.goto(f"{base}/review/accuracy?since=3650d")
    agreement = page.locator("#review_agreement tbody tr").first.inner_text()
    assert agreement.split()[:3] == ["1", "0", "1"]  # reviewed, agreed, disagreed
    assert page.locator("svg.chart rect.bar").count() == 1


def test_review_a_decision_in_the_browser(
    kafka_bootstrap: str, unique: str, tmp_path: Path, categorizer_artifacts: Path
) -> None:
    from playwright.sync_api import sync_playwright

    env = worker_env(kafka_bootstrap, unique, tmp_path, categorizer_artifacts)
    (tmp_path / "outputs.jsonl").write_text(
        "".join(json.dumps({"uuid": u, "model_outputs": o}) + "\n" for u, o in outputs().items())
    )
    ensure_topics(kafka_bootstrap, all_topics(env), 2)
    codec = Codecs().for_schema("pickup-completed")
    produce(
        kafka_bootstrap,
        env["VS_TOPIC_PICKUP_COMPLETED"],
        [(p["shippingid"].encode(), codec.encode(p)) for p in pickups()],
    )
    sink = {**sink_env(env, tmp_path), "VS_REVIEW_USERS": f"reviewer:{PASSWORD}"}
    base = f"http://127.0.0.1:{sink['VS_WEB_PORT']}"
    workers = [
        WorkerProcess(env, tmp_path / "inference.log"),
        WorkerProcess(sink, tmp_path / "sink.log"),
    ]
    shots = os.environ.get("VS_REVIEW_SCREENSHOTS")
    try:
        assert wait_for_lag_zero(
            kafka_bootstrap, f"test-{unique}", [env["VS_TOPIC_PICKUP_COMPLETED"]], 150
        ), workers[0].log_tail()
        assert wait_for_lag_zero(kafka_bootstrap, f"test-{unique}-sink", all_topics(env), 90), (
            workers[1].log_tail()
        )
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            dialogs: list[str] = []
            page.on("dialog", lambda d: _dismissed(d, dialogs))
            _sign_in_and_filter(page, base, shots)
            _check_decision_page(page, shots, dialogs)
            _submit_verdict(page, base)
            browser.close()
        assert workers[1].process.poll() is None, workers[1].log_tail()  # the sink kept running
    finally:
        for worker in workers:
            worker.stop()
    out = streams_cli(
        sink,
        "query",
        "--json",
        "SELECT reviewer, toString(ai_decision) AS ai, toString(reviewer_decision) AS verdict, "
        "answers_marked, answers_wrong, note FROM reviews",
    )
    rows = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])["rows"]
    assert rows == [
        {
            "reviewer": "reviewer",
            "ai": "Not Pick",
            "verdict": "Pick",
            "answers_marked": 2,
            "answers_wrong": 1,
            "note": "Colour is fine in daylight.",
        }
    ]
