"""The review page, served by the sink's web server (docs/review.md).

Routes (registered only when `VS_REVIEW_USERS` names at least one reviewer):

- `GET /review/login`, `POST /review/login`, `POST /review/logout`: a session cookie.
- `GET /review`: the queue, with filters, newest first, paginated.
- `GET /review/decision/{key}`: one decision; `POST` there: the verdict form, which
  becomes a `verification-review` event (acknowledged by the broker before the page
  says so).
- `GET /review/image/{sha256}`: a stored review copy (never an event's URL).
- `GET /review/accuracy`: the accuracy reports and the agreement chart (SVG).
- `GET /review/static/review.css`.

Security: every page and POST needs a session (or, for GETs, the worker's
`VS_WEB_TOKEN` bearer token); the session cookie is HMAC-signed with a per-process
key (HttpOnly, SameSite=Strict), passwords are compared in constant time and never
logged. Every POST carries a CSRF token bound to the session (login: a double-submit
cookie). Templates autoescape everything (model output is untrusted), no page has
a script, and a strict Content-Security-Policy goes with every response.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import re
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any, ClassVar, Protocol
from urllib.parse import quote, urlencode

from faust.web import Request, Response, View
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from processors.review.store import QueueFilter, ReviewStore
from processors.review.verdicts import verdict_from_form
from streams.codecs import Codecs
from streams.settings import Settings
from streams.web import bearer_token_matches

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parent / "templates" / "review"
SESSION_COOKIE = "vs_review"
LOGIN_CSRF_COOKIE = "vs_review_login"
SESSION_S = 8 * 3600
CSP = (
    "default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
ACCURACY_REPORTS = (
    "review_agreement",
    "review_confusion_matrix",
    "review_answer_accuracy",
    "review_agreement_by_product",
    "review_agreement_by_model",
)
_KEY = re.compile(r"^[A-Za-z0-9:._-]{1,200}$")


class Publisher(Protocol):
    """Sends one record; the awaited result is the broker's acknowledgement to await."""

    async def send(self, topic: str, key: bytes | None, value: bytes) -> Awaitable[Any]:
        """Queue the record; await the returned awaitable for the delivery."""
        ...


class ReviewAuth:
    """Reviewers from the settings, signed session cookies and CSRF tokens.

    `key` signs both; a new process has a new key, so sessions end with it.
    """

    def __init__(self, users: tuple[tuple[str, str], ...], key: bytes | None = None) -> None:
        self._users = dict(users)
        self._key = key or secrets.token_bytes(32)

    def __repr__(self) -> str:
        return f"ReviewAuth(users={sorted(self._users)})"

    def check(self, name: str, password: str) -> bool:
        """Constant-time password check; an unknown name costs the same as a wrong password."""
        expected = self._users.get(name, secrets.token_hex(16))
        ok = hmac.compare_digest(password.encode(), expected.encode())
        return ok and name in self._users

    def _sign(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()

    def session(self, name: str, now: float) -> str:
        """A session cookie value for `name`, valid `SESSION_S` from `now`."""
        expires = int(now) + SESSION_S
        return f"{name}|{expires}|{self._sign(f'session|{name}|{expires}')}"

    def user(self, cookie: str | None, now: float) -> str | None:
        """The reviewer a session cookie names, or None (absent, forged, expired)."""
        name, _, rest = (cookie or "").partition("|")
        expires, _, signature = rest.partition("|")
        if not name or not expires.isdigit() or name not in self._users:
            return None
        good = hmac.compare_digest(signature, self._sign(f"session|{name}|{expires}"))
        return name if good and int(expires) > now else None

    def csrf(self, bound_to: str) -> str:
        """The CSRF token bound to a session cookie (or a login nonce)."""
        return self._sign(f"csrf|{bound_to}")

    def csrf_ok(self, bound_to: str | None, token: str) -> bool:
        """Whether `token` is the CSRF token of `bound_to`; False when nothing is bound."""
        return bool(bound_to) and hmac.compare_digest(token, self.csrf(bound_to or ""))


@dataclass(frozen=True, slots=True)
class Bar:
    """One bar of the agreement chart, in SVG user units."""

    x: float
    y: float
    height: float
    label: str
    title: str


def agreement_chart(
    per_day: list[Mapping[str, Any]], width: int = 640, height: int = 180
) -> dict[str, Any]:
    """Bars of agreement_rate per day (0..1 → full height), with counts in the titles."""
    days = per_day[-60:]
    step = width / max(len(days), 1)
    bars = []
    for index, row in enumerate(days):
        rate = float(row["agreement_rate"])
        rate = 0.0 if math.isnan(rate) else min(max(rate, 0.0), 1.0)
        h = rate * (height - 20)
        bars.append(
            Bar(
                x=index * step + 2,
                y=height - 20 - h,
                height=h,
                label=str(row["day"])[5:],
                title=f"{row['day']}: {rate:.0%} of {row['reviewed']} reviewed",
            )
        )
    return {"bars": bars, "bar_width": max(step - 4, 1), "width": width, "height": height}


def _cookie(name: str, value: str, max_age: int) -> str:
    """A Set-Cookie value: HttpOnly, SameSite=Strict, for /review only (max_age 0 deletes)."""
    jar: SimpleCookie = SimpleCookie()
    jar[name] = value
    jar[name]["path"] = "/review"
    jar[name]["max-age"] = str(max_age)
    jar[name]["samesite"] = "Strict"
    return jar[name].OutputString() + "; HttpOnly"


def _parse_filter(query: Mapping[str, str]) -> QueueFilter:
    """The queue filter from the query string; raises `ValueError` naming a bad field."""

    def tri(name: str) -> bool | None:
        value = query.get(name, "")
        if value not in ("", "yes", "no"):
            raise ValueError(f"{name} must be yes or no")
        return None if not value else value == "yes"

    def day(name: str) -> date | None:
        value = query.get(name, "")
        return date.fromisoformat(value) if value else None

    decision = query.get("decision", "")
    if decision not in ("", "Pick", "Not Pick"):
        raise ValueError("decision must be Pick or Not Pick")
    below = query.get("below", "")
    page = query.get("page", "1")
    if not page.isdigit() or not 1 <= int(page) <= 10_000:
        raise ValueError("page must be a number from 1")
    return QueueFilter(
        decision=decision,
        recommendation=query.get("recommendation", "")[:40],
        retake=tri("retake"),
        below=float(below) if below else None,
        product=query.get("product", "")[:200],
        reviewed=tri("reviewed"),
        start=day("from"),
        end=day("to"),
        failures=query.get("kind", "") == "failures",
        page=int(page),
    )


class ReviewPages:
    """What every review view shares: the reviewers, the templates, the store, the verdicts.

    The store opens on first use, once, in a thread (`open_client`); `publisher` sends
    the verdicts, encoded with the registered `verification-review` schema.
    """

    def __init__(
        self,
        settings: Settings,
        publisher: Publisher,
        open_client: Callable[[], Any],
        guard: ReviewAuth,
        clock: Callable[[], float],
    ) -> None:
        self.guard = guard
        self.clock = clock
        self.publisher = publisher
        self.codec = Codecs(settings.schema_registry_url).for_schema("verification-review")
        self.topic = settings.topics.verification_review
        self._token = settings.web_token
        self._open_client = open_client
        self._store: ReviewStore | None = None
        self._lock = asyncio.Lock()
        self.env = Environment(
            loader=FileSystemLoader(TEMPLATES),
            autoescape=select_autoescape(default=True, default_for_string=True),
            undefined=StrictUndefined,
        )
        self.env.filters["q"] = lambda text: quote(str(text), safe="")

    async def store(self) -> ReviewStore:
        """The review store, opened on the first call (concurrent first calls open one)."""
        async with self._lock:
            if self._store is None:
                self._store = ReviewStore(await asyncio.to_thread(self._open_client))
            return self._store

    def page(self, view: View, name: str, status: int = 200, **context: Any) -> Response:
        """Template `name` rendered with `context`, with the security headers."""
        body = self.env.get_template(name).render(**context)
        return view.html(body, status=status, headers=dict(SECURITY_HEADERS))

    def refused(self, view: View, text: str, status: int) -> Response:
        """A plain-text refusal with the security headers."""
        return view.text(text, status=status, headers=dict(SECURITY_HEADERS))

    def reviewer(self, request: Request) -> str | None:
        """The signed-in reviewer of the request's session cookie, or None."""
        return self.guard.user(request.cookies.get(SESSION_COOKIE), self.clock())

    def may_read(self, request: Request) -> str | None:
        """The reviewer, or 'token' for a GET with the worker's bearer token, or None."""
        user = self.reviewer(request)
        if (
            user is None
            and self._token
            and bearer_token_matches(request.headers.get("Authorization"), self._token)
        ):
            return "token"
        return user

    def login_page(self, view: View, status: int = 200, error: str = "") -> Response:
        """The sign-in form with a fresh double-submit CSRF nonce (cookie + hidden field)."""
        nonce = secrets.token_hex(16)
        body = self.env.get_template("login.html").render(
            error=error, csrf=self.guard.csrf(f"login|{nonce}")
        )
        headers = {**SECURITY_HEADERS, "Set-Cookie": _cookie(LOGIN_CSRF_COOKIE, nonce, 600)}
        return view.html(body, status=status, headers=headers)

    def to_login(self, view: View) -> Response:
        """The sign-in form with status 401."""
        return self.login_page(view, 401, "Please sign in.")

    def common(self, request: Request, user: str) -> dict[str, Any]:
        """The context every signed-in page has: the user and the session's CSRF token."""
        session = request.cookies.get(SESSION_COOKIE, "")
        return {"user": user, "csrf": self.guard.csrf(session) if session else ""}

    def not_found(self, view: View, request: Request, user: str) -> Response:
        """The 404 page for a decision key that names no decision."""
        return self.page(
            view,
            "error.html",
            status=404,
            message="No such decision.",
            **self.common(request, user),
        )


class _ReviewView(View):
    """A review route; `register_review_views` binds `pages` in a subclass per app."""

    pages: ClassVar[ReviewPages]


class _Login(_ReviewView):
    async def get(self, request: Request, **kwargs: Any) -> Response:
        """The sign-in form."""
        return self.pages.login_page(self)

    async def post(self, request: Request, **kwargs: Any) -> Response:
        """Sign in: 303 to the queue with a session cookie; 403 without the CSRF nonce."""
        pages = self.pages
        form = await request.post()
        nonce = request.cookies.get(LOGIN_CSRF_COOKIE, "")
        if not nonce or not pages.guard.csrf_ok(f"login|{nonce}", str(form.get("csrf", ""))):
            return pages.refused(self, "CSRF token missing or wrong", 403)
        name, password = str(form.get("user", "")), str(form.get("password", ""))
        if not pages.guard.check(name, password):
            log.info("review login refused")  # never the name or password tried
            return pages.login_page(self, 401, "Wrong user or password.")
        cookie = _cookie(SESSION_COOKIE, pages.guard.session(name, pages.clock()), SESSION_S)
        log.info("reviewer signed in")
        return self.html(
            "",
            status=303,
            headers={**SECURITY_HEADERS, "Location": "/review", "Set-Cookie": cookie},
        )


class _Logout(_ReviewView):
    async def post(self, request: Request, **kwargs: Any) -> Response:
        """Sign out: 303 to the sign-in form, the session cookie deleted."""
        pages = self.pages
        form = await request.post()
        session = request.cookies.get(SESSION_COOKIE)
        if pages.reviewer(request) is None or not pages.guard.csrf_ok(
            session, str(form.get("csrf", ""))
        ):
            return pages.refused(self, "refused", 403)
        headers = {
            **SECURITY_HEADERS,
            "Location": "/review/login",
            "Set-Cookie": _cookie(SESSION_COOKIE, "", 0),
        }
        return self.html("", status=303, headers=headers)


class _Queue(_ReviewView):
    async def get(self, request: Request, **kwargs: Any) -> Response:
        """The queue page for the query's filter; 400 naming a bad filter field."""
        pages = self.pages
        user = pages.may_read(request)
        if user is None:
            return pages.to_login(self)
        query = {k: str(v) for k, v in request.query.items()}
        try:
            wanted = _parse_filter(query)
        except ValueError as exc:
            return pages.page(
                self, "error.html", status=400, message=str(exc), **pages.common(request, user)
            )
        result = await asyncio.to_thread((await pages.store()).queue, wanted)
        keep = {k: v for k, v in query.items() if k != "page" and v}

        def link(number: int) -> str:
            return "/review?" + urlencode({**keep, "page": number})

        return pages.page(
            self, "queue.html", rows=result.rows, wanted=wanted, query=query,
            previous=link(result.page - 1) if result.page > 1 else "",
            next=link(result.page + 1) if result.has_next else "",
            **pages.common(request, user),
        )  # fmt: skip


class _Decision(_ReviewView):
    async def get(self, request: Request, **kwargs: Any) -> Response:
        """One decision with the verdict form; 404 for an unknown key."""
        pages = self.pages
        user = pages.may_read(request)
        if user is None:
            return pages.to_login(self)
        key = str(request.match_info["key"])
        return await self._show(request, user, key, saved=request.query.get("saved") == "1")

    async def _show(self, request: Request, user: str, key: str, **extra: Any) -> Response:
        pages = self.pages
        detail = None
        if _KEY.match(key):
            detail = await asyncio.to_thread((await pages.store()).decision, key)
        if detail is None:
            return pages.not_found(self, request, user)
        return pages.page(
            self, "decision.html", d=detail, key=key, review_id=uuid.uuid4().hex,
            error=extra.get("error", ""), saved=extra.get("saved", False),
            **pages.common(request, user),
        )  # fmt: skip

    async def post(self, request: Request, **kwargs: Any) -> Response:
        """Send the verdict form as a `verification-review` event, then 303 to the decision.

        The broker has acknowledged the event before the reviewer is told it is saved.
        An invalid form shows the decision again with the error; 401 without a session,
        403 without the CSRF token, 404 for an unknown key.
        """
        pages = self.pages
        user = pages.reviewer(request)
        session = request.cookies.get(SESSION_COOKIE)
        if user is None:
            return pages.refused(self, "sign in first", 401)
        form = {k: str(v) for k, v in (await request.post()).items()}
        if not pages.guard.csrf_ok(session, form.get("csrf", "")):
            return pages.refused(self, "CSRF token missing or wrong", 403)
        key = str(request.match_info["key"])
        detail = (
            await asyncio.to_thread((await pages.store()).decision, key)
            if _KEY.match(key)
            else None
        )
        if detail is None:
            return pages.not_found(self, request, user)
        decision = {**detail.decision, "idempotency_key": key}
        try:
            verdict = verdict_from_form(
                form,
                decision,
                detail.answers,
                reviewer=user,
                now=datetime.fromtimestamp(pages.clock(), UTC),
            )
        except ValueError as exc:
            return await self._show(request, user, key, error=str(exc))
        event = pages.codec.encode(verdict.to_event())
        delivery = await pages.publisher.send(pages.topic, key.encode(), event)
        await delivery  # the broker has it before the reviewer is told so
        log.info("verdict %s on %s sent", verdict.review_id, key)
        location = f"/review/decision/{quote(key, safe='')}?saved=1"
        return self.html("", status=303, headers={**SECURITY_HEADERS, "Location": location})


class _ReviewCopy(_ReviewView):
    async def get(self, request: Request, **kwargs: Any) -> Response:
        """A stored review copy as JPEG; 401 without access, 404 for an unknown hash."""
        pages = self.pages
        if pages.may_read(request) is None:
            return pages.refused(self, "sign in first", 401)
        data = await asyncio.to_thread((await pages.store()).image, str(request.match_info["sha"]))
        if data is None:
            return pages.refused(self, "no such review copy", 404)
        headers = {**SECURITY_HEADERS, "Cache-Control": "private, max-age=86400, immutable"}
        return self.bytes(data, content_type="image/jpeg", headers=headers)


class _Accuracy(_ReviewView):
    async def get(self, request: Request, **kwargs: Any) -> Response:
        """The accuracy reports since `since` (default 30d); 400 for a bad `since`."""
        pages = self.pages
        user = pages.may_read(request)
        if user is None:
            return pages.to_login(self)
        from processors.analytics.reports import parse_since, report_description, run_report

        since_text = request.query.get("since") or "30d"
        try:
            since = parse_since(since_text)
        except ValueError as exc:
            return pages.page(
                self, "error.html", status=400, message=str(exc), **pages.common(request, user)
            )
        client = (await pages.store()).client

        def run_all() -> dict[str, Any]:
            return {
                n: run_report(client, n, since)
                for n in (*ACCURACY_REPORTS, "review_agreement_per_day")
            }

        results = await asyncio.to_thread(run_all)
        chart = agreement_chart(results["review_agreement_per_day"].as_dicts())
        reports = [(n, report_description(n), results[n]) for n in ACCURACY_REPORTS]
        return pages.page(self, "accuracy.html", reports=reports, chart=chart, since=since_text,
                          **pages.common(request, user))  # fmt: skip


class _Stylesheet(_ReviewView):
    async def get(self, request: Request, **kwargs: Any) -> Response:
        """The review stylesheet."""
        css = (TEMPLATES / "review.css").read_text(encoding="utf-8")
        return self.text(css, content_type="text/css", headers=dict(SECURITY_HEADERS))


# (path, route name suffix, view)
_ROUTES: tuple[tuple[str, str, type[_ReviewView]], ...] = (
    ("/review", "queue", _Queue),
    ("/review/login", "login", _Login),
    ("/review/logout", "logout", _Logout),
    ("/review/decision/{key}", "decision", _Decision),
    ("/review/image/{sha}", "reviewcopy", _ReviewCopy),
    ("/review/accuracy", "accuracy", _Accuracy),
    ("/review/static/review.css", "stylesheet", _Stylesheet),
)


def register_review_views(
    app: Any,
    settings: Settings,
    publisher: Publisher,
    open_client: Callable[[], Any],
    *,
    auth: ReviewAuth | None = None,
    clock: Callable[[], float] = time.time,
) -> list[str]:
    """Add the review routes to the faust `app`; returns their paths.

    `open_client()` opens the ClickHouse client (once, on first use, in a thread);
    `publisher` sends the verdicts. Call before the worker starts.
    """
    guard: ReviewAuth = auth or ReviewAuth(settings.review.users)
    pages = ReviewPages(settings, publisher, open_client, guard, clock)
    for path, name, view in _ROUTES:
        # A subclass per app, so two apps in one process keep their own pages.
        bound = type(view.__name__.lstrip("_"), (view,), {"pages": pages})
        app.page(path, name=f"visionstream:review-{name}")(bound)
    return [path for path, _, _ in _ROUTES]


def register_review_upkeep(
    app: Any, settings: Settings, open_client: Callable[[], Any], interval_s: float = 600.0
) -> None:
    """A sink timer: set the copies' retention once, then keep them within the size budget.

    Runs in a thread with its own client; a failure is logged and retried next time
    (the copies are a convenience for reviewers, never a reason to stop the sink).
    """
    from processors.review.store import apply_retention, enforce_budget

    review = settings.review
    state: dict[str, Any] = {}

    def upkeep() -> int:
        if "client" not in state:
            state["client"] = open_client()
            apply_retention(state["client"], review.retention_days)
        return enforce_budget(state["client"], review.store_max_bytes)

    @app.timer(interval=interval_s)
    async def review_copies_upkeep() -> None:
        try:
            freed = await asyncio.to_thread(upkeep)
        # The contract: an exception would stop the sink's timer, and the ClickHouse
        # drivers raise many unrelated types; log it and retry next time.
        except Exception as exc:  # noqa: BLE001
            log.warning("review copies upkeep failed: %s", type(exc).__name__)
            return
        if freed:
            log.info("review copies over the budget: %d bytes deleted", freed)
