"""Logging: JSON lines with context, stdlib records through the same renderer, one handler however often set up."""

from __future__ import annotations

import io
import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import structlog

from sidecar import log


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


class TestJSON:
    def test_one_object_per_line(self) -> None:
        """Each event is a JSON object with event, level, ISO UTC timestamp, logger name and bound context."""
        out = io.StringIO()
        log.setup("info", "json", out)
        structlog.contextvars.bind_contextvars(request_id="r-1")
        log.get_logger("sidecar.test").info("batch_shipped", db="app.db", pages=3)
        [line] = lines(out)
        assert line["event"] == "batch_shipped"
        assert line["level"] == "info"
        assert line["logger"] == "sidecar.test"
        assert (line["db"], line["pages"], line["request_id"]) == ("app.db", 3, "r-1")
        assert datetime.fromisoformat(line["timestamp"]).utcoffset() is not None

    def test_level_filters(self) -> None:
        """Events below the level are dropped."""
        out = io.StringIO()
        log.setup("warning", "json", out)
        logger = log.get_logger("sidecar.test")
        logger.info("dropped")
        logger.warning("kept")
        assert [line["event"] for line in lines(out)] == ["kept"]

    def test_exceptions_are_data(self) -> None:
        """A traceback is structured, on the same single line, without frame locals."""
        out = io.StringIO()
        log.setup("info", "json", out)
        token = "s3cret"
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.get_logger("sidecar.test").exception("upload_failed", token_len=len(token))
        [line] = lines(out)
        assert line["exception"][0]["exc_type"] == "RuntimeError"
        assert token not in out.getvalue()

    def test_non_json_values_are_strings(self) -> None:
        """Paths and other objects are rendered with str()."""
        out = io.StringIO()
        log.setup("info", "json", out)
        log.get_logger("sidecar.test").info("opened", path=Path("/x/y"))
        assert lines(out)[0]["path"] == "/x/y"


class TestStdlib:
    def test_stdlib_records_go_through(self) -> None:
        """aiohttp's access log comes out as the same JSON, with its logger name and context vars."""
        out = io.StringIO()
        log.setup("info", "json", out)
        structlog.contextvars.bind_contextvars(request_id="r-2")
        logging.getLogger("aiohttp.access").info('%s "%s" %d', "127.0.0.1", "GET /pos", 200)
        [line] = lines(out)
        assert line["event"] == '127.0.0.1 "GET /pos" 200'
        assert line["logger"] == "aiohttp.access"
        assert line["level"] == "info"
        assert line["request_id"] == "r-2"
        assert "timestamp" in line

    def test_stdlib_level_follows_setup(self) -> None:
        """Stdlib debug records are dropped at info."""
        out = io.StringIO()
        log.setup("info", "json", out)
        logging.getLogger("aiohttp.server").debug("hidden")
        assert out.getvalue() == ""


class TestSetup:
    def test_idempotent(self) -> None:
        """Setting up twice leaves one handler of ours and writes each event once, to the new stream."""
        first, second = io.StringIO(), io.StringIO()
        log.setup("info", "json", first)
        log.setup("info", "json", second)
        log.get_logger("sidecar.test").info("once")
        logging.getLogger("other").warning("also once")
        assert first.getvalue() == ""
        assert [line["event"] for line in lines(second)] == ["once", "also once"]

    def test_leaves_other_handlers_alone(self) -> None:
        """Handlers someone else installed (pytest's, for one) survive setup()."""
        theirs = logging.NullHandler()
        logging.getLogger().addHandler(theirs)
        log.setup("info", "json", io.StringIO())
        log.setup("info", "json", io.StringIO())
        assert theirs in logging.getLogger().handlers

    def test_auto_is_json_off_a_tty(self) -> None:
        """A pipe or file gets JSON."""
        out = io.StringIO()
        log.setup("info", "auto", out)
        log.get_logger("sidecar.test").info("piped")
        assert lines(out)[0]["event"] == "piped"

    def test_auto_is_console_at_a_tty(self) -> None:
        """A terminal gets the console renderer, in colour."""
        out = _TTY()
        log.setup("info", "auto", out)
        log.get_logger("sidecar.test").info("typed", db="app.db")
        text = out.getvalue()
        assert "typed" in text
        assert "\x1b[" in text
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)

    def test_console_off_a_tty_has_no_colour(self) -> None:
        """Forcing console into a file writes no escape codes."""
        out = io.StringIO()
        log.setup("info", "console", out)
        log.get_logger("sidecar.test").info("plain")
        assert "\x1b[" not in out.getvalue()

    def test_noisy_libraries_stay_quiet_at_debug(self) -> None:
        """botocore's per-request debug output is not let through."""
        out = io.StringIO()
        log.setup("debug", "json", out)
        logging.getLogger("botocore.auth").debug("signature")
        log.get_logger("sidecar.test").debug("ours")
        assert [line["event"] for line in lines(out)] == ["ours"]

    @pytest.mark.parametrize(("level", "fmt"), [("loud", "json"), ("info", "xml")])
    def test_rejects_unknown_level_or_format(self, level: str, fmt: str) -> None:
        """Bad arguments fail loudly instead of logging nothing."""
        with pytest.raises(ValueError):
            log.setup(level, fmt, io.StringIO())
