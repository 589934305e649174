"""The dashboard, end to end: a real headless Chromium (Debian's `chromium`) driven by Playwright against a real
server on 127.0.0.1 holding a real backup history.

Screenshots go to a temporary directory; with LITEFS_SIDECAR_SCREENSHOTS=1 they replace those in docs/screenshots/.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest

from sidecar.engine.index import reachable
from sidecar.ltx import format_timestamp
from sidecar.server import Scope
from tests.engine.history import History
from tests.server.client import BackupClient
from tests.server.conftest import ADMIN, OTHER, READER, TOKEN, Running, start_server

CHROMIUM = "/usr/bin/chromium"
playwright_api = pytest.importorskip("playwright.async_api", reason="Playwright is not installed (pip install "
                                     "playwright); ./test.sh installs it")
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"{CHROMIUM} is absent (apt-get install chromium); ./test.sh installs it")

SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
T0 = int(time.time() * 1000) - 3_600_000  # ms: an hour ago (within every retention), a transaction a minute


@dataclass
class Backed:
    """A server holding `app.db` (6 transactions) in cluster default and `side.db` in cluster other."""

    srv: Running
    history: History
    counts: dict[int, int]  # txid -> rows in `events` after it
    shots: Path

    @property
    def url(self) -> str:
        return self.srv.url

    async def restored(self, cluster: str, name: str, tmp: Path) -> sqlite3.Connection:
        out = tmp / f"check-{cluster}-{name}-{self.srv.engine.pos(cluster, name).txid}.db"
        await self.srv.engine.restore_to(cluster, name, out)
        return sqlite3.connect(out)


@pytest.fixture
async def backed(tmp_path: Path) -> AsyncIterator[Backed]:
    srv = await start_server(tmp_path)
    history = History(tmp_path / "live.db")
    counts = {}
    async with aiohttp.ClientSession() as http:
        client = BackupClient(http, srv.url, TOKEN)
        for i in range(6):
            history.write(n=3 + i)
            await client.write_tx("app.db", history.commit(T0 + i * 60_000))
            counts[history.pos.txid] = history.con.execute("SELECT count(*) FROM events").fetchone()[0]
        other = History(tmp_path / "side.db", seed=2)
        other.write()
        await BackupClient(http, srv.url, OTHER).write_tx("side.db", other.commit(T0))
        other.close()
    shots = SHOTS if os.environ.get("LITEFS_SIDECAR_SCREENSHOTS") == "1" else tmp_path / "shots"
    shots.mkdir(parents=True, exist_ok=True)
    yield Backed(srv, history, counts, shots)
    history.close()
    if not srv.task.done():
        await srv.shutdown()


@pytest.fixture
async def page() -> AsyncIterator[object]:
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        context = await browser.new_context(viewport={"width": 1200, "height": 900}, accept_downloads=True)
        pg = await context.new_page()
        pg.set_default_timeout(15_000)
        yield pg
        await context.close()
        await browser.close()


async def sign_in(page: object, url: str, token: str) -> None:
    pg: playwright_api.Page = page  # type: ignore[assignment]
    await pg.goto(f"{url}/ui/")
    await pg.fill("#token", token)
    await pg.click("#sign-in")
    await pg.wait_for_selector("#databases tr[data-db]")


def hx(txid: int) -> str:
    return f"{txid:016x}"


async def test_sign_in_refuses_a_wrong_token_and_scopes_a_cluster_token(backed: Backed, page: object) -> None:
    pg: playwright_api.Page = page  # type: ignore[assignment]
    await pg.goto(f"{backed.url}/ui")
    await pg.fill("#token", "not-a-token")
    await pg.click("#sign-in")
    await pg.wait_for_selector("#login-error:has-text('invalid token')")
    await pg.screenshot(path=str(backed.shots / "login.png"))
    assert await pg.locator("#databases").count() == 0

    await pg.fill("#token", TOKEN)
    await pg.click("#sign-in")
    await pg.wait_for_selector("#databases tr[data-db]")
    rows = await pg.locator("#databases tr[data-db]").evaluate_all("rs => rs.map(r => r.dataset.db)")
    assert rows == ["default/app.db"]  # the cluster token sees only its cluster
    assert "cluster default" in await pg.inner_text("#who")


async def test_a_database_of_another_cluster_is_refused_without_signing_out(backed: Backed, page: object) -> None:
    """A cluster token's session opening another cluster's database (a link an admin shared) sees the refusal, not
    \"your session ended\": the session is still good."""
    pg: playwright_api.Page = page  # type: ignore[assignment]
    await sign_in(pg, backed.url, TOKEN)
    await pg.goto(f"{backed.url}/ui/#/db/other/side.db")
    await pg.wait_for_selector("#error:has-text('does not grant cluster')")
    assert await pg.locator("#token").count() == 0
    await pg.click("a[href='#/']")
    await pg.wait_for_selector("#databases tr[data-db='default/app.db']")


async def test_overview_lists_every_cluster_for_admin_and_refreshes_live(backed: Backed, page: object) -> None:
    pg: playwright_api.Page = page  # type: ignore[assignment]
    await sign_in(pg, backed.url, ADMIN)
    rows = await pg.locator("#databases tr[data-db]").evaluate_all("rs => rs.map(r => r.dataset.db)")
    assert rows == ["default/app.db", "other/side.db"]
    app = pg.locator("#databases tr[data-db='default/app.db'] td")
    cells = await app.all_inner_texts()
    assert cells[2] == hx(6) and cells[3] == hx(6) and cells[4] == "0"  # position, HWM (flushed), lag
    points = backed.srv.engine.restore_points("default", "app.db")
    assert cells[6].startswith(str(datetime.now(UTC).year)) and cells[7] == str(len(points))
    await pg.screenshot(path=str(backed.shots / "overview.png"))
    # A new upload shows up without a reload.
    backed.history.write()
    async with aiohttp.ClientSession() as http:
        await BackupClient(http, backed.url, TOKEN).write_tx("app.db", backed.history.commit(T0 + 600_000))
    await pg.wait_for_selector(f"#databases tr[data-db='default/app.db'] td:has-text('{hx(7)}')", timeout=10_000)


async def test_restore_previews_then_asks_for_the_name_and_appends_a_new_head(backed: Backed, page: object,
                                                                            tmp_path: Path) -> None:
    pg: playwright_api.Page = page  # type: ignore[assignment]
    engine = backed.srv.engine
    await sign_in(pg, backed.url, ADMIN)
    await pg.click("a[href='#/db/default/app.db']")
    await pg.wait_for_selector("#timeline .point")
    # Every L0 file is a restore point (the server's ticker may add coarser levels' points at any moment).
    index = engine.index("default", "app.db")
    reach = reachable(index)
    l0 = sum(1 for e in index.level(0) if e.max_txid in reach)
    assert await pg.locator("#timeline .timeline[data-level='0'] .point").count() == l0 == 6
    await pg.screenshot(path=str(backed.shots / "database.png"), full_page=True)

    # By time: a second after TXID 4's commit (TXID 5 came a minute later), typed as UTC.
    at = datetime.fromtimestamp(backed.history.times[4] / 1000 + 1, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    await pg.fill("#restore-time", at)
    await pg.click("#preview-button")
    await pg.wait_for_selector("#preview-tables tr[data-table='events']")
    assert await pg.inner_text("#preview-txid") == hx(4)
    assert await pg.inner_text("#preview-tables tr[data-table='events'] td.num") == str(backed.counts[4])

    # By TXID, by clicking the timeline's third L0 point.
    await pg.locator("#timeline .timeline[data-level='0'] .point").nth(2).click()
    assert await pg.input_value("#restore-txid") == hx(3)
    await pg.click("#preview-button")
    await pg.wait_for_selector(f"#preview-txid:has-text('{hx(3)}')")
    assert await pg.inner_text("#preview-tables tr[data-table='events'] td.num") == str(backed.counts[3])
    assert await pg.is_disabled("#restore")
    await pg.fill("#confirm-name", "app")  # not the name: still refused
    assert await pg.is_disabled("#restore")
    await pg.fill("#confirm-name", "app.db")
    assert await pg.is_enabled("#restore")
    await pg.screenshot(path=str(backed.shots / "restore-confirm.png"), full_page=True)
    assert engine.pos("default", "app.db").txid == 6  # nothing changed before the confirmation
    await pg.click("#restore")
    await pg.wait_for_selector("#restore-result:has-text('new head')")

    assert engine.pos("default", "app.db").txid == 7  # a new head transaction; history kept
    con = await backed.restored("default", "app.db", tmp_path)
    assert con.execute("SELECT count(*) FROM events").fetchone()[0] == backed.counts[3]
    con.close()
    assert hx(7) in await pg.inner_text("#status")


async def test_restore_applies_the_state_previewed_not_a_newer_one(backed: Backed, page: object) -> None:
    """A restore by time restores the TXID its preview showed, even if uploads since then fall before that time."""
    pg: playwright_api.Page = page  # type: ignore[assignment]
    engine = backed.srv.engine
    await sign_in(pg, backed.url, ADMIN)
    await pg.goto(f"{backed.url}/ui/#/db/default/app.db")
    at = datetime.fromtimestamp((T0 + 30 * 60_000) / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    await pg.fill("#restore-time", at)
    await pg.click("#preview-button")
    await pg.wait_for_selector("#preview-tables tr[data-table='events']")
    assert await pg.inner_text("#preview-txid") == hx(6)
    backed.history.write()  # LiteFS uploads TXID 7, committed before the time typed, while the operator reads
    async with aiohttp.ClientSession() as http:
        await BackupClient(http, backed.url, TOKEN).write_tx("app.db", backed.history.commit(T0 + 10 * 60_000))
    await pg.fill("#confirm-name", "app.db")
    await pg.click("#restore")
    await pg.wait_for_selector("#restore-result:has-text('new head')")
    assert f"Restored TXID {hx(6)}" in await pg.inner_text("#restore-result")
    assert engine.pos("default", "app.db").txid == 8


async def test_download_at_a_txid_opens_as_sqlite(backed: Backed, page: object, tmp_path: Path) -> None:
    pg: playwright_api.Page = page  # type: ignore[assignment]
    await sign_in(pg, backed.url, TOKEN)
    await pg.goto(f"{backed.url}/ui/#/db/default/app.db")
    await pg.fill("#download-txid", hx(2))
    async with pg.expect_download() as info:
        await pg.click("#download-link")
    download = await info.value
    out = tmp_path / "downloaded.db"
    await download.save_as(str(out))
    con = sqlite3.connect(out)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("SELECT count(*) FROM events").fetchone()[0] == backed.counts[2]
    con.close()


async def test_upload_makes_the_file_the_new_head(backed: Backed, page: object, tmp_path: Path) -> None:
    pg: playwright_api.Page = page  # type: ignore[assignment]
    src = tmp_path / "new.db"
    con = sqlite3.connect(src)
    con.execute("CREATE TABLE uploaded (x)")
    con.executemany("INSERT INTO uploaded VALUES (?)", [(i,) for i in range(5)])
    con.commit()
    con.close()
    await sign_in(pg, backed.url, TOKEN)
    await pg.goto(f"{backed.url}/ui/#/db/default/app.db")
    await pg.set_input_files("#upload-file", str(src))
    await pg.click("#upload")
    await pg.wait_for_selector("#upload-result:has-text('Uploaded new.db')")
    engine = backed.srv.engine
    assert engine.pos("default", "app.db").txid == 7
    got = await backed.restored("default", "app.db", tmp_path)
    assert got.execute("SELECT count(*) FROM uploaded").fetchone()[0] == 5
    got.close()


async def test_clone_into_another_cluster(backed: Backed, page: object, tmp_path: Path) -> None:
    pg: playwright_api.Page = page  # type: ignore[assignment]
    await sign_in(pg, backed.url, ADMIN)
    await pg.goto(f"{backed.url}/ui/#/db/default/app.db")
    await pg.fill("#clone-cluster", "staging")
    await pg.fill("#clone-name", "copy.db")
    await pg.click("#clone")
    await pg.wait_for_selector("#clone-result:has-text('staging/copy.db')")
    got = await backed.restored("staging", "copy.db", tmp_path)
    assert got.execute("SELECT count(*) FROM events").fetchone()[0] == backed.counts[6]
    got.close()


async def test_a_failed_operation_shows_its_error_and_changes_nothing(backed: Backed, page: object,
                                                                     tmp_path: Path) -> None:
    pg: playwright_api.Page = page  # type: ignore[assignment]
    engine = backed.srv.engine
    before = engine.pos("default", "app.db")
    await sign_in(pg, backed.url, TOKEN)
    await pg.goto(f"{backed.url}/ui/#/db/default/app.db")
    # A cluster token may not clone into another cluster.
    await pg.fill("#clone-cluster", "staging")
    await pg.click("#clone")
    await pg.wait_for_selector("#error:has-text('does not grant cluster')")
    # Not a SQLite file.
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"definitely not sqlite" * 200)
    await pg.set_input_files("#upload-file", str(junk))
    await pg.click("#upload")
    await pg.wait_for_selector("#error:has-text('not a SQLite database')")
    # A preview before the first restore point.
    await pg.fill("#restore-time", "2020-01-01T00:00:00")
    await pg.click("#preview-button")
    await pg.wait_for_selector("#error:not([hidden])")
    assert await pg.is_hidden("#confirm")
    await pg.screenshot(path=str(backed.shots / "error.png"))
    assert engine.pos("default", "app.db") == before
    assert not engine.exists("staging", "app.db")


async def test_changes_need_the_session_csrf_token(backed: Backed) -> None:
    """The cookie alone changes nothing: a cross-site form could send it, but cannot read the CSRF token."""
    engine = backed.srv.engine
    before = engine.pos("default", "app.db")
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        async with http.post(f"{backed.url}/ui/login", json={"token": ADMIN}) as resp:
            assert resp.status == 200
            csrf = (await resp.json())["csrf"]
            cookie = resp.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        restore = f"{backed.url}/api/restore?cluster=default&db=app.db"
        for headers in ({}, {"X-CSRF-Token": "forged"}):
            async with http.post(restore, json={"txid": hx(2)}, headers=headers) as resp:
                assert resp.status == 403
                assert (await resp.json())["code"] == "ECSRF"
        assert engine.pos("default", "app.db") == before
        async with http.get(f"{backed.url}/api/databases") as resp:  # reading needs no CSRF token
            assert resp.status == 200
        async with http.post(restore, json={"txid": hx(2)}, headers={"X-CSRF-Token": csrf}) as resp:
            assert resp.status == 200
        assert engine.pos("default", "app.db").txid == before.txid + 1
        async with http.post(f"{backed.url}/ui/logout", headers={"X-CSRF-Token": csrf}) as resp:
            assert resp.status == 200
        async with http.get(f"{backed.url}/api/databases") as resp:
            assert resp.status == 401
    async with aiohttp.ClientSession() as http, http.post(f"{backed.url}/ui/login", json={"token": "nope"}) as resp:
        assert resp.status == 401


async def test_a_session_ends_when_its_token_changes_scope(backed: Backed) -> None:
    """After a restart with the token made read-only or moved to another cluster, its session no longer acts."""
    engine = backed.srv.engine
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        async with http.post(f"{backed.url}/ui/login", json={"token": TOKEN}) as resp:
            assert resp.status == 200
            csrf = (await resp.json())["csrf"]
        cookies = {c.key: c.value for c in jar}
        await backed.srv.shutdown()
        before = engine.pos("default", "app.db")
        for changed in (Scope("default", True), Scope("other")):
            tokens = {TOKEN: changed, OTHER: Scope("other"), READER: Scope("default", True)}  # the same strings
            srv = await start_server(backed.srv.root, tokens=tokens)
            try:
                async with http.post(f"{srv.url}/api/restore?db=app.db", json={"txid": hx(2)}, cookies=cookies,
                                     headers={"X-CSRF-Token": csrf}) as resp:
                    assert resp.status == 401, (changed, await resp.text())
                async with http.get(f"{srv.url}/ui/session", cookies=cookies) as resp:
                    assert resp.status == 401, changed
                assert srv.engine.pos("default", "app.db") == before
            finally:
                await srv.shutdown()
        srv = await start_server(backed.srv.root)  # the tokens as they were: the session still works
        try:
            async with http.get(f"{srv.url}/ui/session", cookies=cookies) as resp:
                assert resp.status == 200 and (await resp.json())["scope"] == "default"
        finally:
            await srv.shutdown()


async def test_every_level_has_its_timeline_and_its_stretch_of_time(backed: Backed, page: object) -> None:
    """Compactions show as their own timelines and table rows, not hidden behind L0's points at the same TXIDs."""
    pg: playwright_api.Page = page  # type: ignore[assignment]
    engine = backed.srv.engine
    for level in (1, 2, 9):  # whatever the server's own ticker has not compacted yet: every level reaches TXID 6
        await engine.compact_level("default", "app.db", level)
    index = engine.index("default", "app.db")
    reach = reachable(index)
    ends = {lv: [e for e in index.level(lv) if e.max_txid in reach] for lv in (0, 1, 2, 9)}
    assert all(files[-1].max_txid == 6 for files in ends.values())
    await sign_in(pg, backed.url, ADMIN)
    await pg.goto(f"{backed.url}/ui/#/db/default/app.db")
    await pg.wait_for_selector("#timeline .timeline[data-level='9'] .point")
    for lv, files in ends.items():
        assert await pg.locator(f"#timeline .timeline[data-level='{lv}'] .point").count() == len(files)
    rows = await pg.locator("#levels tr[data-level]").evaluate_all(
        "rs => rs.map(r => [...r.querySelectorAll('td')].map(c => c.innerText))")
    kinds = {0: "L0 flushes of uploads", 1: "L1 compactions of L0", 2: "L2 compactions of L1", 9: "L9 snapshots"}
    every = {0: "every upload", 1: "every 5 min", 2: "every 1 h", 9: "every 24 h"}
    assert rows == [[kinds[lv], every[lv], format_timestamp(files[0].timestamp), format_timestamp(files[-1].timestamp),
                     str(len(files))] for lv, files in ends.items()]


async def test_an_overview_answer_that_comes_after_leaving_it_leaves_the_database_page_alone(
        backed: Backed, page: object) -> None:
    """The overview's list, answered only once the operator is on a database page: it neither clears that page's
    error nor starts the overview's refresh behind it."""
    pg: playwright_api.Page = page  # type: ignore[assignment]
    await sign_in(pg, backed.url, TOKEN)
    held: list[playwright_api.Route] = []
    await pg.route("**/api/databases", lambda r: held.append(r))
    await pg.goto(f"{backed.url}/ui/#/")  # the overview asks for the list: held
    await pg.evaluate("location.hash = '#/db/default/app.db'")
    await pg.wait_for_selector("#status")
    await pg.click("#preview-button")  # nothing chosen: the page says so
    await pg.wait_for_selector("#error:has-text('Choose a date and time or a TXID')")
    [late] = held
    async with pg.expect_event("requestfinished", lambda r: r.url.endswith("/api/databases")):
        await late.continue_()
    await pg.evaluate("new Promise(r => setTimeout(r, 100))")  # the answer's handler has run
    assert await pg.evaluate("refresh") is None
    assert "Choose a date and time or a TXID" in await pg.inner_text("#error")
