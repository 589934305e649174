"""bench/server_bench.py's own parts: the arithmetic its tables come from, its HTTP client and its proxy."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import multiprocessing as mp
import time
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from bench.server_bench import (
    Endpoint,
    HwmLag,
    Result,
    Step,
    Target,
    _database,
    flushes_total,
    held_sizes,
    largest_held,
    log_growing,
    mean_ms,
    medians,
    metric_total,
    parse_args,
    parse_metrics,
    percentile,
    plan,
    proxy,
    rate,
    read_response,
    retry_after,
    summary,
)


class TestHwmLag:
    def test_lag_is_the_age_of_the_oldest_acknowledged_upload_above_the_hwm(self) -> None:
        lag = HwmLag()
        assert lag.ack(3, 10.0, 0) == 0.0  # just acknowledged
        assert lag.ack(6, 11.0, 0) == 1.0  # the first is still above the HWM
        assert lag.ack(9, 12.0, 4) == 1.0  # HWM 4 covers the first, not the second (TXIDs 4-6)
        assert lag.ack(12, 13.0, 12) == 0.0  # everything covered

    def test_a_hwm_that_never_moves_gives_a_lag_that_grows(self) -> None:
        lag = HwmLag()
        assert [lag.ack(3 * (j + 1), float(j), 0) for j in range(4)] == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize(("series", "expected"), [
    ([(t, float(t % 10)) for t in range(0, 61)], False),  # a sawtooth: each quarter holds the same peak
    ([(t, float(t % 10 + t)) for t in range(0, 61)], True),  # the same, climbing
    ([(t, 100.0 + t / 60) for t in range(0, 61)], False),  # a little growth, under 25%
    ([(t, 1.0 + t / 10) for t in range(0, 61)], True),  # doubling over the half
    ([(0.0, 1.0), (59.0, 9.0)], None),  # no sample in the third quarter: cannot say
    ([], None),
])
def test_log_growing_compares_the_last_quarters_peaks(series: list[tuple[float, float]],
                                                      expected: bool | None) -> None:
    assert log_growing(series, 0.0, 60.0, slack=0.0) is expected


def test_log_growing_allows_the_slack() -> None:
    series = [(float(t), 0.0 if t < 45 else 5.0) for t in range(0, 61)]
    assert log_growing(series, 0.0, 60.0, slack=0.0) is True
    assert log_growing(series, 0.0, 60.0, slack=5.0) is False


def test_percentile_is_the_nearest_rank_below() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 51.0
    assert percentile(values, 0.99) == 100.0
    assert math.isnan(percentile([], 0.5))


@pytest.mark.parametrize(("headers", "seconds"), [
    ({"retry-after": "3"}, 3.0), ({}, 1.0), ({"retry-after": "120"}, 5.0),
    ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 1.0), ({"retry-after": "-2"}, 0.0),
])
def test_retry_after(headers: dict[str, str], seconds: float) -> None:
    assert retry_after(headers) == seconds


def exposition(build: Callable[[CollectorRegistry], None]) -> str:
    registry = CollectorRegistry()
    build(registry)
    return generate_latest(registry).decode()


class TestMetrics:
    def test_totals_by_label_summed_over_processes(self) -> None:
        def one(r: CollectorRegistry) -> None:
            c = Counter("lfsc_store_requests", "", ["op"], registry=r)
            c.labels("put").inc(5)
            c.labels("get").inc(2)
        scrape = parse_metrics([exposition(one), exposition(one)])
        assert metric_total(scrape, "lfsc_store_requests_total", op="put") == 10
        assert metric_total(scrape, "lfsc_store_requests_total") == 14
        assert metric_total(scrape, "lfsc_store_requests_total", op="head") is None
        assert metric_total(scrape, "lfsc_absent") is None
        assert metric_total(None, "lfsc_store_requests_total") is None

    def test_per_database_gauges_keep_their_labels(self) -> None:
        def lags(r: CollectorRegistry) -> None:
            g = Gauge("lfsc_hwm_lag_seconds", "", ["cluster", "db"], registry=r)
            g.labels("c", "a.db").set(1.5)
            g.labels("c", "b.db").set(12.0)
        scrape = parse_metrics([exposition(lags)])
        assert sorted(v for _, v in scrape["lfsc_hwm_lag_seconds"]) == [1.5, 12.0]

    def test_flushes_from_lfsc_flushes_total_else_level_0_builds(self) -> None:
        def flushes(r: CollectorRegistry) -> None:
            Counter("lfsc_flushes", "", registry=r).inc(7)

        def builds(r: CollectorRegistry) -> None:
            h = Histogram("lfsc_build_seconds", "", ["level"], registry=r)
            for _ in range(3):
                h.labels("0").observe(0.01)
            h.labels("1").observe(0.5)
        assert flushes_total(parse_metrics([exposition(flushes)])) == 7
        assert flushes_total(parse_metrics([exposition(builds)])) == 3
        assert flushes_total(parse_metrics([""])) is None

    def test_mean_of_a_histogram_between_two_scrapes(self) -> None:
        registry = CollectorRegistry()
        h = Histogram("lfsc_store_request_seconds", "", ["op"], registry=registry)
        h.labels("put").observe(1.0)
        h.labels("get").observe(9.0)
        first = parse_metrics([generate_latest(registry).decode()])
        h.labels("put").observe(0.010)
        h.labels("put").observe(0.030)
        last = parse_metrics([generate_latest(registry).decode()])
        assert mean_ms(first, last, "lfsc_store_request_seconds", op="put") == pytest.approx(20.0)
        assert mean_ms(first, first, "lfsc_store_request_seconds", op="put") is None  # nothing observed between
        assert mean_ms(None, None, "lfsc_store_request_seconds", op="put") is None

    def test_rate_of_a_counter_first_seen_at_the_end_starts_from_zero(self) -> None:
        assert rate(10.0, 30.0, 10.0) == 2.0
        assert rate(None, 30.0, 10.0) == 3.0
        assert rate(10.0, None, 10.0) is None


def make_step(**changes: object) -> Step:
    step = Step(target=Target("serve"), n=100, steady=True, l0=10.0, span=60.0, uploads_per_s=100.0, p50=0.002,
                p99=0.1, errors=0, retries=0, cpu=6.0, sys_cpu=1.0, uploads=6000, rss=80.0, peak=90.0,
                client_cpu=0.1, store_cpu=None, proxy_cpu=None, puts_per_s=None, store_req_per_s=None,
                flushes_per_s=None, lag=(5.0, 11.0, 12.0), server_lag=None, server_lag_max=None, put_ms=None,
                flush_concurrency=None, log_series=[],
                pending_series=[], growing=False, baseline_cpu_per_upload=0.0005)
    return dataclasses.replace(step, **changes)  # type: ignore[arg-type]


class TestHeld:
    def test_held_in_steady_state(self) -> None:
        step = make_step()
        assert step.held
        assert step.cpu_per_upload == 0.001
        assert step.baseline_ratio == 2.0

    @pytest.mark.parametrize("changes", [
        {"p99": 0.25}, {"errors": 1}, {"uploads_per_s": 98.0},  # acknowledgement
        {"lag": (5.0, 25.1, 30.0)}, {"growing": True},  # the store not keeping up
    ])
    def test_not_held(self, changes: dict[str, object]) -> None:
        assert not make_step(**changes).held

    def test_lag_and_log_count_only_in_steady_mode_and_only_when_known(self) -> None:
        assert make_step(steady=False, lag=(50.0, 90.0, 99.0), growing=True).held
        assert make_step(lag=None, growing=None).held
        assert make_step(target=Target("baseline"), lag=(50.0, 90.0, 99.0)).held

    def test_503s_are_not_errors(self) -> None:
        assert make_step(retries=40).held


class TestSummary:
    def test_a_size_is_held_only_if_every_repeat_held(self) -> None:
        steps = [make_step(n=100), make_step(n=100, rep=1), make_step(n=200, uploads_per_s=200.0),
                 make_step(n=200, rep=1, p99=0.3)]
        assert held_sizes(steps) == [100]
        assert largest_held(steps) == "100"
        assert largest_held(steps[:2]) == "≥100"  # the largest size tried: maybe more would hold
        assert largest_held([make_step(errors=3)]) == "none"

    def test_medians_per_size(self) -> None:
        assert medians([(200, 3.0), (100, 1.0), (100, 5.0), (100, 2.0)]) == {100: 2.0, 200: 3.0}

    def test_ratios_pair_steps_of_the_same_size_and_repeat(self, capsys: pytest.CaptureFixture[str]) -> None:
        one, two, off = Target("serve", 1), Target("serve", 2), Target("serve", 1, verify=False)
        steps = [make_step(target=Target("baseline"), cpu=1.5, baseline_cpu_per_upload=None),
                 make_step(target=one, n=100, cpu=6.0),  # 1 ms per upload, 2× the baseline's 0.5 ms
                 make_step(target=off, n=100, cpu=4.8),
                 make_step(target=two, n=100), make_step(target=one, n=200, p99=0.3),
                 make_step(target=off, n=200, p99=0.3), make_step(target=two, n=200, uploads_per_s=200.0)]
        summary(steps, [Target("baseline"), one, off, two], parse_args(["--mode", "steady"]), 0.5)
        out = capsys.readouterr().out
        assert "aiohttp baseline             N=100 4000/s" in out
        assert "serve workers=1              N=100 2.00× (1000/s), N=200 2.00× (1000/s)" in out
        assert "on / off: N=100 1.000 / 0.800 = 1.25×" in out
        assert "workers: 1 holds 100, 2 hold ≥200: 2/1 = 2.00×" in out


class TestPlan:
    def test_one_target_per_setting_the_baseline_first(self) -> None:
        args = parse_args(["--verify", "on,off", "--workers", "1,2", "--proxy", "3"])
        assert [t.label for t in plan(args)] == [
            "aiohttp baseline", "serve workers=1", "serve workers=1 verify=off", "serve workers=2",
            "serve workers=2 verify=off", "proxy→3×serve"]

    def test_url_is_the_only_target(self) -> None:
        args = parse_args(["--url", "http://127.0.0.1:9", "--auth", "FlyV1 x"])
        assert [t.kind for t in plan(args)] == ["url"]

    def test_steady_steps_last_six_l0_intervals_after_the_warmup(self) -> None:
        assert parse_args(["--mode", "steady"]).seconds == 63
        assert parse_args(["--mode", "steady", "--l0-interval", "2s", "--warmup", "2"]).seconds == 14
        assert parse_args([]).seconds == 15

    @pytest.mark.parametrize("argv", [
        ["--url", "http://127.0.0.1:9"],  # no --auth
        ["--mode", "steady", "--seconds", "30"],  # shorter than 6 L0 intervals
        ["--verify", "yes"],
    ])
    def test_refused(self, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert "error:" in capsys.readouterr().err

    def test_url_needs_an_origin(self) -> None:
        assert Endpoint.parse("https://backup.example") == Endpoint("backup.example", 443, True)
        with pytest.raises(SystemExit, match="no path"):
            Endpoint.parse("http://127.0.0.1:9/db")


def reader_of(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def test_read_response_reads_both_body_framings_on_one_connection() -> None:
    reader = reader_of(b"HTTP/1.1 200 OK\r\nLitefs-Hwm: 000000000000000c\r\nContent-Length: 5\r\n\r\nhello"
                       b"HTTP/1.1 409 Conflict\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"
                       b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 2\r\n\r\n")
    assert await read_response(reader) == (200, {"litefs-hwm": "000000000000000c", "content-length": "5"})
    assert (await read_response(reader))[0] == 409
    assert await read_response(reader) == (503, {"retry-after": "2"})
    assert reader.at_eof()


@pytest.fixture
async def flaky_server() -> AsyncIterator[tuple[Endpoint, list[int]]]:
    """/db/tx answers 503, then 500, then 200s with the HWM two uploads behind; `statuses` is what it sent."""
    statuses: list[int] = []

    async def post_tx(request: web.Request) -> web.Response:
        body = await request.read()
        assert body[:4] == b"LTX1" and request.headers["Authorization"] == "FlyV1 t"
        status = [503, 500][len(statuses)] if len(statuses) < 2 else 200
        statuses.append(status)
        hwm = 3 * max(0, statuses.count(200) - 2)
        return web.Response(status=status, headers={"Retry-After": "0", "Litefs-Hwm": f"{hwm:016x}"})
    app = web.Application()
    app.router.add_post("/db/tx", post_tx)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield Endpoint("127.0.0.1", runner.addresses[0][1]), statuses
    finally:
        await runner.cleanup()


async def test_client_retries_5xx_as_litefs_and_counts_them_apart(flaky_server: tuple[Endpoint, list[int]]) -> None:
    endpoint, statuses = flaky_server
    out: list[Result] = []
    await _database(endpoint, "a.db", "FlyV1 t", [b"LTX1" + bytes(96)] * 3, time.monotonic(), 3, 0.0, out)
    assert statuses == [503, 500, 200, 200, 200]
    assert [(r.status, r.busy, r.failed) for r in out] == [(200, 1, 1), (200, 0, 0), (200, 0, 0)]
    assert out[0].lag == 0.0 and out[1].lag > 0 and out[2].lag > 0  # the second waits for its HWM


async def test_proxy_sends_each_connection_to_the_next_backend() -> None:
    runners = []
    for name in ("a", "b"):
        async def who(request: web.Request, name: str = name) -> web.Response:
            return web.Response(text=name)
        app = web.Application()
        app.router.add_get("/", who)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=proxy, args=([r.addresses[0][1] for r in runners], child), daemon=True)
    process.start()
    try:
        port = await asyncio.to_thread(parent.recv)
        seen = []
        for _ in range(4):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            seen.append((await reader.read()).rsplit(b"\r\n\r\n", 1)[1].decode())
            writer.close()
            await writer.wait_closed()
        assert seen == ["a", "b", "a", "b"]
    finally:
        process.terminate()
        process.join()
        parent.close()
        for runner in runners:
            await runner.cleanup()
