"""The agent's structured logs: one line per event, JSON (for a log pipeline: Loki, Elastic,
`kubectl logs | jq`) or text (for a person).

    log = AgentLog("json")                    # stderr, info and above
    log.info("process.traced", "tracing a Go process", pid=1234, exe="/srv/api")
    log.notice(notice)                        # an otelwater.events.model.Notice
    capture_library_logs(log)                 # Python logging (opentelemetry, grpc) the same way

JSON: {"time": "2025-01-31T12:00:00.123Z", "level": "info", "event": "process.traced", "msg":
"tracing a Go process", "pid": 1234, "exe": "/srv/api"}: time RFC 3339 in UTC with
milliseconds, then level, event (a dotted name to filter on), msg (for a person), then the
fields. A field that JSON cannot hold (an object, NaN, a set) is its repr(); a field named
like one of the first four keys is renamed with a trailing "_". Text: `2025-01-31T12:00:00.123Z
info process.traced: tracing a Go process pid=1234 exe=/srv/api` (a value with a space, a
quote or an = in it is quoted as JSON; newlines are escaped, so a line is always one event).

A line is written whole and flushed; lines of several threads do not interleave. Writing never
raises: a closed stream (the reader of a pipe went away, BrokenPipeError) or a full disk makes
the log drop its lines (counted in `dropped`), never stops the agent.

Library logs. capture_library_logs(log) puts a logging.Handler on the root logger, so what the
libraries log (opentelemetry's exporters: "Transient error StatusCode.UNAVAILABLE encountered
while exporting metrics to localhost:4317, retrying in 1.00s.", "Failed to export ...") comes
out as the same lines (event "library.<package>", field `logger`; `error` and `stack` when the
record carries an exception), Python warnings too (logging.captureWarnings), and a thread that
dies of an exception (threading.excepthook: "thread NAME stopped: ..."). They are rate-limited:
a message is said the first time, then what repeats it (same logger, level and format string: a
retry's changing delay is the same message) at most once every `every_s` (60 s), the line
saying how many were not printed since the previous one (field `suppressed`), so a Collector
down for an hour makes about 60 lines, not thousands. The handler's flush() (the agent calls it
now and then; logging.shutdown() calls it at exit, through close()) says the count of a message
that stopped repeating.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
import traceback
from collections import OrderedDict
from datetime import datetime, timezone
from typing import IO, Callable

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
FORMATS = ("json", "text")
RESERVED = ("time", "level", "event", "msg")
REPEAT_EVERY_S = 60.0           # a repeated library message: at most one line this often
MAX_REPEAT_KEYS = 1024          # distinct library messages remembered for the rate limit
LIBRARY_EVENT = "library"       # event of library logs: "library.<top-level package>"
SEPARATORS = (",", ":")         # compact JSON


def rfc3339_ms(t: float) -> str:
    """Seconds since the epoch as RFC 3339 UTC with milliseconds: 2025-01-31T12:00:00.123Z."""
    ms = int(t * 1000)
    d = datetime.fromtimestamp(ms // 1000, timezone.utc)
    return d.strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}Z"


def _plain(value):
    """`value` as JSON can hold it: itself when it can, else its repr()."""
    try:
        json.dumps(value, allow_nan=False)
        return value
    except (TypeError, ValueError, RecursionError):
        try:
            return repr(value)
        except Exception:  # noqa: BLE001 - a repr that raises
            return f"<{type(value).__name__}>"


def _text_value(value) -> str:
    """key=VALUE of a text line: a plain word as it is, a string with a space, quote or = in it
    as JSON, numbers and JSON's constants as JSON writes them, anything else as compact JSON
    (or its repr, quoted when it needs to be)."""
    if isinstance(value, str):
        if value and not any(c.isspace() or c in '"=' for c in value):
            return value
        return json.dumps(value)
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
        return str(value)
    plain = _plain(value)
    if isinstance(plain, str):
        return _text_value(plain)
    return json.dumps(plain, separators=SEPARATORS)


class AgentLog:
    """Structured log lines on `stream` (module docstring). `level`: the lowest said (debug,
    info, warning, error); `now`: the clock of the time stamps (seconds since the epoch)."""

    def __init__(self, fmt: str = "json", stream: IO[str] | None = None, level: str = "info",
                 *, now: Callable[[], float] = time.time):
        if fmt not in FORMATS:
            raise ValueError(f"log format {fmt!r}: give {' or '.join(FORMATS)}")
        if level not in LEVELS:
            raise ValueError(f"log level {level!r}: give one of {', '.join(LEVELS)}")
        self.fmt = fmt
        self.stream = stream if stream is not None else sys.stderr
        self.level = level
        self.threshold = LEVELS[level]
        self.now = now
        self.dropped = 0                # lines the stream did not take
        self.broken = False             # the stream is closed: lines are dropped from now on
        self._lock = threading.Lock()

    def enabled(self, level: str) -> bool:
        return LEVELS[level] >= self.threshold

    def debug(self, event: str, msg: str, /, **fields) -> None:
        self.log("debug", event, msg, **fields)

    def info(self, event: str, msg: str, /, **fields) -> None:
        self.log("info", event, msg, **fields)

    def warning(self, event: str, msg: str, /, **fields) -> None:
        self.log("warning", event, msg, **fields)

    def error(self, event: str, msg: str, /, **fields) -> None:
        self.log("error", event, msg, **fields)

    def log(self, level: str, event: str, msg: str, /, **fields) -> None:
        if LEVELS.get(level, 40) < self.threshold:
            return
        try:
            line = self.format(level, event, msg, fields)
        except Exception as e:  # noqa: BLE001 - a log line never stops the agent
            line = self.format("error", "log.unformattable", f"{type(e).__name__}: {e}",
                               {"event_": str(event)})
        self._write(line)

    def notice(self, n, level: str = "info") -> None:
        """An otelwater.events.model.Notice (said once by the probes: a traced process exited,
        stacks that stay addresses, goids that cannot be read) as a line: event
        "notice.<source>", its text, and its CLOCK_MONOTONIC `ts_ns`."""
        self.log(level, f"notice.{n.source}", n.text, ts_ns=n.ts_ns)

    def format(self, level: str, event: str, msg: str, fields: dict) -> str:
        """One line, newline included."""
        head = {"time": rfc3339_ms(self.now()), "level": level, "event": str(event),
                "msg": str(msg)}
        rest = {(f"{k}_" if k in RESERVED else str(k)): v for k, v in fields.items()}
        if self.fmt == "json":
            try:
                return json.dumps({**head, **rest}, allow_nan=False, separators=SEPARATORS) + "\n"
            except (TypeError, ValueError, RecursionError):
                plain = {k: _plain(v) for k, v in rest.items()}
                return json.dumps({**head, **plain}, allow_nan=False,
                                  separators=SEPARATORS) + "\n"
        text = f"{head['time']} {level} {head['event']}: {head['msg']}"
        if rest:
            text += " " + " ".join(f"{k}={_text_value(v)}" for k, v in rest.items())
        return text.replace("\r", "\\r").replace("\n", "\\n") + "\n"

    def _write(self, line: str) -> None:
        with self._lock:
            if self.broken:
                self.dropped += 1
                return
            try:
                self.stream.write(line)
                self.stream.flush()
            except (BrokenPipeError, ValueError):   # the reader went away / a closed file
                self.broken = True
                self.dropped += 1
            except OSError:                         # a full disk: this line, not the next
                self.dropped += 1

    def stream_for(self, event: str, level: str = "warning",
                   prefix: str = "otelwater: ") -> "LogStream":
        """A file-like object whose lines become log lines (what otelwater's parts print for a
        person, e.g. ExportHealth's "OTLP export to ... failing", given as their `out`)."""
        return LogStream(self, event, level, prefix)

    def __repr__(self) -> str:
        return f"AgentLog({self.fmt!r}, level={self.level!r})"


class LogStream:
    """A file-like object for code that prints its one-line messages for a person (the
    export's health, the pipeline's): write() text, each complete line (across writes) one log
    line of `event` at `level`, `prefix` taken off; close() says a line left unfinished."""

    def __init__(self, log: AgentLog, event: str, level: str = "warning",
                 prefix: str = "otelwater: "):
        self.log, self.event, self.level, self.prefix = log, event, level, prefix
        self._part = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            self._part += text
            *lines, self._part = self._part.split("\n")
        for line in lines:
            if line.strip():
                self.log.log(self.level, self.event, line.removeprefix(self.prefix))
        return len(text)

    def flush(self) -> None:
        pass                            # a line is said when it ends

    def close(self) -> None:
        with self._lock:
            line, self._part = self._part, ""
        if line.strip():
            self.log.log(self.level, self.event, line.removeprefix(self.prefix))

    def isatty(self) -> bool:
        return False


class RepeatLimit:
    """Which repeats of a message to say: the first, then at most one every `every_s`
    (module docstring). `now`: seconds, monotonic (tests step it)."""

    def __init__(self, every_s: float = REPEAT_EVERY_S, now: Callable[[], float] = time.monotonic,
                 max_keys: int = MAX_REPEAT_KEYS):
        self.every_s = every_s
        self.now = now
        self.max_keys = max_keys
        # key -> [time said last, not said since, the last one not said]
        self._keys: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def admit(self, key, item) -> int | None:
        """None: do not say `item` (counted); else say it, with this many like it not said
        since the previous line."""
        t = self.now()
        with self._lock:
            got = self._keys.get(key)
            if got is None:
                self._keys[key] = [t, 0, None]
                if len(self._keys) > self.max_keys:
                    self._keys.popitem(last=False)
                return 0
            self._keys.move_to_end(key)
            if t - got[0] >= self.every_s:
                suppressed = got[1]
                got[:] = [t, 0, None]
                return suppressed
            got[1] += 1
            got[2] = item
            return None

    def due(self, final: bool = False) -> list[tuple[object, int]]:
        """(the last item not said, how many before it were not said) for each message that
        stopped repeating at least every_s after its last line (`final`: all of them)."""
        t = self.now()
        out = []
        with self._lock:
            for got in self._keys.values():
                if got[1] and (final or t - got[0] >= self.every_s):
                    out.append((got[2], got[1] - 1))
                    got[:] = [t, 0, None]
        return out


class LibraryLogHandler(logging.Handler):
    """Python logging records as AgentLog lines, repeats limited (module docstring)."""

    def __init__(self, log: AgentLog, level: int = logging.WARNING,
                 every_s: float = REPEAT_EVERY_S, now: Callable[[], float] = time.monotonic):
        super().__init__(level)
        self.agent_log = log
        self.limit = RepeatLimit(every_s, now)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            key = (record.name, record.levelno, str(record.msg))
            suppressed = self.limit.admit(key, record)
            if suppressed is not None:
                self._say(record, suppressed)
        except Exception:  # noqa: BLE001 - logging must never stop the agent
            pass

    def _say(self, record: logging.LogRecord, suppressed: int) -> None:
        level = ("debug" if record.levelno < logging.INFO else
                 "info" if record.levelno < logging.WARNING else
                 "warning" if record.levelno < logging.ERROR else "error")
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a record whose args do not fit its format
            msg = f"{record.msg!r} {record.args!r}"
        fields = {"logger": record.name}
        if record.exc_info and record.exc_info[1] is not None:
            e = record.exc_info[1]
            fields["error"] = f"{type(e).__name__}: {e}"
            fields["stack"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        if suppressed:
            fields["suppressed"] = suppressed
        package = record.name.split(".", 1)[0] or "root"
        self.agent_log.log(level, f"{LIBRARY_EVENT}.{package}", msg, **fields)

    def flush(self) -> None:
        """Say the count of each message that stopped repeating a minute ago or more."""
        for record, suppressed in self.limit.due():
            self._say(record, suppressed)

    def close(self) -> None:
        try:
            for record, suppressed in self.limit.due(final=True):
                self._say(record, suppressed)
        finally:
            super().close()

    def handleError(self, record) -> None:  # noqa: N802 - logging's name
        pass


def capture_library_logs(log: AgentLog, level: str = "warning",
                         every_s: float = REPEAT_EVERY_S,
                         now: Callable[[], float] = time.monotonic) -> LibraryLogHandler:
    """Route Python logging (and warnings, and the exceptions that end threads) at `level` and
    above into `log` (module docstring): a LibraryLogHandler on the root logger, in place of
    one installed before; the root logger's level set to `level`, the opentelemetry loggers'
    reset to follow it (the watch's otlp.options.quiet_sdk_logs() silences them: call this
    after making the sinks, or the retries stay silent), gRPC's C core kept off stderr.
    Returns the handler (its flush() says the counts of repeats that ended)."""
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, LibraryLogHandler)]:
        root.removeHandler(h)
        h.close()
    handler = LibraryLogHandler(log, LEVELS[level], every_s, now)
    root.addHandler(handler)
    root.setLevel(LEVELS[level])
    logging.getLogger("opentelemetry").setLevel(logging.NOTSET)
    logging.captureWarnings(True)
    threading.excepthook = _thread_failed
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")   # gRPC core's own stderr lines
    return handler


def _thread_failed(args) -> None:
    """threading.excepthook: a thread that died of an exception is a logged error (with its
    stack, rate-limited like any library message), not a traceback on stderr."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("otelwater.thread").error(
        "thread %s stopped: %s: %s", name, args.exc_type.__name__, args.exc_value,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
