"""The recording format: what `otelwater record` (and `watch --record`) observed, in one file.

Version 1, documented in docs/recording.md. A recording is gzip-compressed JSON Lines (RFC 1952
members, one after another; `zcat FILE | jq` reads it):

    line 1      header   {"type": "otelwater-recording", "version": 1, host, start_ns, clock,
                          started_wall_ns, otelwater_version, options, config, processes}
    lines 2..   records  exactly what the records' to_json() gives: "snapshot", "read", "lost",
                         "notice", and "process" (a process first seen after the header), in
                         the order `watch` handed them to its analysis
    last line   end      {"type": "end", "ts_ns", "wall_ns", "records", "clock", "skipped"}

"Record N" is line N of the decompressed text (the header is record 1). The Writer ends a gzip
member at least every `flush_s` (1 s) and sync-flushes after every batch, so everything handed
to it is in the file when `write()` returns: a `kill -9` loses at most the batch being written.
A file without its end record was cut short; the Reader yields every record before the break and
then raises RecordingError naming the file and the record.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import socket
import time
import zlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator
from urllib.parse import unquote

from otelwater import __version__
from otelwater.errors import OtelwaterError, RecordingError, UsageError
from otelwater.events.model import LostEvents, Notice, ReadRecord, VerdictCounts, WaterSnapshot

FORMAT = "otelwater-recording"
VERSION = 1
CLOCK_SAMPLES = 64
FIX_CUT = ("results cover the records before it; stop `otelwater record` with Ctrl-C, "
           "SIGTERM or --duration for a whole file")
FIX_BAD = "the file is damaged or not a recording written by `otelwater record`"


# -- clocks, hosts, processes -------------------------------------------------------------------

def measure_clock(samples: int = CLOCK_SAMPLES) -> dict:
    """CLOCK_REALTIME minus CLOCK_MONOTONIC, measured as the exporter measures it
    (otelwater.clock.WallClock.measure: the tightest of `samples` back-to-back
    monotonic / realtime / monotonic readings, the offset at their midpoint)."""
    from otelwater.clock import WallClock

    c = WallClock.measure(samples)
    return {"realtime_minus_monotonic_ns": c.offset_ns, "error_ns": c.error_ns,
            "method": f"best of {samples} back-to-back CLOCK_MONOTONIC, CLOCK_REALTIME, "
                      "CLOCK_MONOTONIC readings; offset at the midpoint, error half the gap "
                      "plus 1 ns of resolution"}


def host_identity() -> dict:
    def read(path: str) -> str | None:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return None

    u = platform.uname()
    # CLOCK_MONOTONIC counts from boot: its values mean something only within one boot
    return {"name": socket.gethostname(), "kernel": u.release, "machine": u.machine,
            "boot_id": read("/proc/sys/kernel/random/boot_id")}


def parse_resource_attributes(text: str) -> dict[str, str] | None:
    """OTEL_RESOURCE_ATTRIBUTES ("k1=v1,k2=v2", values percent-encoded) as a dict; None when
    malformed (the OpenTelemetry SDK specification discards the whole value then)."""
    out: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            return None
        try:
            out[key] = unquote(value.strip(), errors="strict")
        except UnicodeDecodeError:
            return None
    return out


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """Who a traced process is, so an export can name the service: read from /proc at first
    sight (in the header, or as a "process" record before the first record that names it)."""

    pid: int
    ts_ns: int                    # when otelwater looked (CLOCK_MONOTONIC)
    exe: str | None               # /proc/PID/exe (None: exited or unreadable)
    comm: str | None
    cmdline: tuple[str, ...]
    service_name: str | None      # OTEL_SERVICE_NAME, else service.name of the attributes
    resource_attributes: dict | None  # OTEL_RESOURCE_ATTRIBUTES parsed (None: malformed)
    start_time: int | None        # ns after boot (/proc/PID/stat starttime): pid + start_time
                                  # name one process even if the pid is reused later

    def to_json(self) -> dict:
        d = {name: getattr(self, name) for name in self.__slots__}
        d["type"] = "process"
        d["cmdline"] = list(self.cmdline)
        return d


def process_info(pid: int, ts_ns: int | None = None, comm: str | None = None) -> ProcessInfo:
    """A process's identity from /proc; fields it cannot read are None (`comm` stands in)."""
    base = f"/proc/{pid}"

    def read(name: str) -> bytes | None:
        try:
            with open(f"{base}/{name}", "rb") as f:
                return f.read()
        except OSError:
            return None

    try:
        exe = os.readlink(f"{base}/exe")
    except OSError:
        exe = None
    raw_comm = read("comm")
    if raw_comm is not None:
        comm = raw_comm.decode(errors="replace").rstrip("\n")
    cmdline = tuple(a.decode(errors="replace") for a in (read("cmdline") or b"").split(b"\0")
                    if a)
    env: dict[str, str] = {}
    for entry in (read("environ") or b"").split(b"\0"):
        k, sep, v = entry.partition(b"=")
        if sep and k in (b"OTEL_SERVICE_NAME", b"OTEL_RESOURCE_ATTRIBUTES"):
            env[k.decode()] = v.decode(errors="replace")
    attrs = parse_resource_attributes(env.get("OTEL_RESOURCE_ATTRIBUTES", ""))
    service = env.get("OTEL_SERVICE_NAME") or (attrs or {}).get("service.name") or None
    start_time = None
    stat = read("stat")
    if stat is not None:
        try:  # field 22, counted after the ")" that ends comm (comm may hold spaces)
            ticks = int(stat[stat.rindex(b")") + 2:].split()[19])
            start_time = ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")
        except (ValueError, IndexError):
            pass
    return ProcessInfo(pid=pid, ts_ns=time.monotonic_ns() if ts_ns is None else ts_ns,
                       exe=exe, comm=comm, cmdline=cmdline, service_name=service,
                       resource_attributes=attrs, start_time=start_time)


# -- the header ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Header:
    version: int
    start_ns: int              # CLOCK_MONOTONIC when the probes were attached: reads that began
                               # before it are "unknown" (their start was not seen)
    started_wall_ns: int       # CLOCK_REALTIME at the same moment
    clock: dict                # realtime_minus_monotonic_ns, error_ns, method
    host: dict                 # name, kernel, machine, boot_id
    otelwater_version: str
    options: dict              # the selectors and probe options of the run
    config: dict               # the analysis configuration of the run (Config.to_dict())
    processes: dict[int, ProcessInfo]

    def wall_ns(self, ts_ns: int) -> int:
        """A CLOCK_MONOTONIC time of this recording as CLOCK_REALTIME (ns since the epoch)."""
        return ts_ns + self.clock["realtime_minus_monotonic_ns"]

    def to_json(self) -> dict:
        return {"type": FORMAT, "version": self.version, "host": self.host,
                "start_ns": self.start_ns, "started_wall_ns": self.started_wall_ns,
                "clock": self.clock, "otelwater_version": self.otelwater_version,
                "options": self.options, "config": self.config,
                "processes": {str(pid): _without(p.to_json(), "type", "pid")
                              for pid, p in self.processes.items()}}


def _without(d: dict, *keys: str) -> dict:
    for k in keys:
        d.pop(k, None)
    return d


# -- from JSON: the records' own fields, checked ------------------------------------------------

class _Bad(Exception):
    """A record that does not parse: what broke (the Reader adds file and record number)."""


def _check_int(v):
    if type(v) is not int:
        raise TypeError("an integer")
    return v


def _check_str(v):
    if type(v) is not str:
        raise TypeError("a string")
    return v


def _check_optional(check):
    def f(v):
        return None if v is None else check(v)
    return f


def _check_bool(v):
    if type(v) is not bool:
        raise TypeError("true or false")
    return v


def _check_stack(v):
    if type(v) is not list or any(type(x) is not str for x in v):
        raise TypeError("a list of strings")
    return tuple(v)


def _check_counts(v):
    if type(v) is not list or any(type(x) is not int or x < 0 for x in v):
        raise TypeError("a list of counts")
    return tuple(v)


def _check_key(v):
    if type(v) is not str or not 1 <= len(v) <= 16:
        raise TypeError("16 hex digits")
    return int(v, 16)  # ValueError when not hex


def _check_dict(v):
    if type(v) is not dict:
        raise TypeError("an object")
    return v


_CHECKS = {"int": _check_int, "str": _check_str, "bool": _check_bool,
           "tuple[str, ...]": _check_stack, "dict": _check_dict,
           "tuple[int, ...]": _check_counts}


def _field_checks(cls, overrides: dict) -> tuple[tuple[str, Any, bool, Any], ...]:
    """(name, check, required, default) for each field of a record class, from its
    annotations: a field added later with a default is read from older files too."""
    out = []
    for f in dataclasses.fields(cls):
        check = overrides.get(f.name)
        if check is None:
            t = f.type if isinstance(f.type, str) else f.type.__name__
            optional = t.endswith(" | None")
            base = _CHECKS[t.removesuffix(" | None")]  # KeyError: a new type; teach it here
            check = _check_optional(base) if optional else base
        has_default = f.default is not dataclasses.MISSING
        out.append((f.name, check, not has_default, f.default if has_default else None))
    return tuple(out)


def _reader(cls, overrides: dict | None = None):
    checks = _field_checks(cls, overrides or {})
    kind = cls.__name__

    def from_json(d: dict):
        kw = {}
        for name, check, required, default in checks:
            if name in d:
                try:
                    kw[name] = check(d[name])
                except (TypeError, ValueError) as e:
                    want = e.args[0] if isinstance(e, TypeError) and e.args else "valid"
                    raise _Bad(f"{d.get('type')} field {name} is {json.dumps(d[name])[:40]}, "
                               f"expected {want}") from None
            elif required:
                raise _Bad(f"{d.get('type')} record lacks field {name}")
            else:
                kw[name] = default
        return cls(**kw)

    from_json.__name__ = f"{kind}_from_json"
    from_json.__doc__ = f"A {kind} from its to_json() dict (extra keys ignored); _Bad if not."
    return from_json


snapshot_from_json = _reader(WaterSnapshot, {"sock_key": _check_key})
read_from_json = _reader(ReadRecord, {"sock_key": _check_key})
lost_from_json = _reader(LostEvents)
notice_from_json = _reader(Notice)
counts_from_json = _reader(VerdictCounts)
_process_fields = _reader(ProcessInfo, {
    "resource_attributes": _check_optional(_check_dict),
    "cmdline": _check_stack})


def process_from_json(d: dict) -> ProcessInfo:
    return _process_fields(d)


FROM_JSON = {"snapshot": snapshot_from_json, "read": read_from_json, "lost": lost_from_json,
             "notice": notice_from_json, "process": process_from_json,
             "counts": counts_from_json}
RECORD_TYPES = {WaterSnapshot: "snapshot", ReadRecord: "read", LostEvents: "lost",
                Notice: "notice", ProcessInfo: "process", VerdictCounts: "counts"}


# -- from JSON, fast: msgspec checks the same things in C ----------------------------------------
#
# json.loads into a dict, then a Python check per field, cost most of `otelwater correlate`'s
# time (13-17 µs a snapshot here, 3-4x this path). msgspec decodes a line straight into a typed
# dataclass, checking each field's type as it goes (an int is an int: not a bool, not 3.0; a
# string a string; a stack a list of strings; an optional field null or its type; a missing
# field its default, or an error when it has none; unknown keys skipped; the last of repeated
# keys wins, as with json.loads).
# It cannot turn the hex `sock_key` string into an int, so each record class gets a twin here:
# a plain (not frozen) slots dataclass with the same fields in the same order, `sock_key` a
# string. A decoded twin gets its key converted, then becomes the record by assigning its
# `__class__` (the two have the same slots, so the same memory layout: CPython allows it).
#
# The fast path only ever accepts what the checks above accept, with the same result; anything
# it does not take (a malformed line, an unknown type, the end record, a lone surrogate, NaN,
# a key that is not 1-16 characters...) goes through the checks above, which give the record or
# the error.
# tests/unit/test_recording_fast.py holds the two paths to that.

try:
    import msgspec
except ImportError:         # the checks above read every file too, 3-4x slower
    msgspec = None

_WIRE_TYPES = {"int": int, "str": str, "bool": bool, "tuple[str, ...]": tuple[str, ...],
               "dict": dict}


def _twin(cls):
    """``cls``'s twin for msgspec (see above), or None if a field has a type not taught here."""
    fields = []
    for f in dataclasses.fields(cls):
        t = f.type if isinstance(f.type, str) else f.type.__name__
        base = _WIRE_TYPES.get(t.removesuffix(" | None"))
        if base is None:
            return None
        if f.name == "sock_key":
            base = str          # 16 hex digits in JSON
        tp = base | None if t.endswith(" | None") else base
        if f.default is not dataclasses.MISSING:
            fields.append((f.name, tp, dataclasses.field(default=f.default)))
        elif f.default_factory is not dataclasses.MISSING:
            return None
        else:
            fields.append((f.name, tp))
    twin = dataclasses.make_dataclass(f"_{cls.__name__}Wire", fields, slots=True)
    if twin.__slots__ != cls.__slots__:
        return None
    return twin


def _fast_decoders() -> dict | None:
    """type -> (msgspec decoder of the twin, record class, whether it has a hex sock_key)."""
    if msgspec is None:
        return None
    out = {}
    for cls, kind in RECORD_TYPES.items():
        twin = _twin(cls)
        if twin is None:
            continue            # that type goes the slow way
        out[kind] = (msgspec.json.Decoder(twin).decode, cls, "sock_key" in cls.__slots__)
    return out


class _Kind(msgspec.Struct if msgspec is not None else object):
    """A line's "type" (msgspec skips the rest without building it)."""

    type: str | None = None


_FAST = _fast_decoders()
_FAST_ERRORS = (KeyError, ValueError, TypeError) + (
    (msgspec.DecodeError,) if msgspec is not None else ())


def fast_record(line: bytes, _kind=msgspec.json.Decoder(_Kind).decode if msgspec else None,
                _decoders=_FAST):
    """The record of a line as the checks above would give it; None when the fast path does not
    take the line (then the checks above say what it is, or what is wrong with it)."""
    if _decoders is None:
        return None
    try:
        decode, cls, keyed = _decoders[_kind(line).type]
        rec = decode(line)
        if keyed:
            key = rec.sock_key
            if not 1 <= len(key) <= 16:
                return None
            rec.sock_key = int(key, 16)
        rec.__class__ = cls
        return rec
    except _FAST_ERRORS:
        return None


def header_from_json(d: dict) -> Header:
    if d.get("type") != FORMAT:
        raise _Bad("not an otelwater recording (the first line is not its header)")
    version = d.get("version")
    if version != VERSION:
        raise _Bad(f"format version {version!r}; this otelwater ({__version__}) reads "
                   f"version {VERSION}")
    try:
        clock = _check_dict(d["clock"])
        _check_int(clock["realtime_minus_monotonic_ns"])
        processes = {}
        for pid, p in _check_dict(d.get("processes", {})).items():
            processes[int(pid)] = process_from_json(dict(_check_dict(p), pid=int(pid),
                                                         type="process"))
        return Header(version=version, start_ns=_check_int(d["start_ns"]),
                      started_wall_ns=_check_int(d["started_wall_ns"]), clock=clock,
                      host=_check_dict(d.get("host", {})),
                      otelwater_version=_check_str(d.get("otelwater_version", "")),
                      options=_check_dict(d.get("options", {})),
                      config=_check_dict(d.get("config", {})), processes=processes)
    except KeyError as e:
        raise _Bad(f"header lacks {e.args[0]}") from None
    except (TypeError, ValueError) as e:
        raise _Bad(f"header has a field of the wrong type ({e})") from None


# -- the writer ---------------------------------------------------------------------------------

def check_writable(path: str, force: bool, flag: str = "--force") -> None:
    """Refuse, before anything is attached, to overwrite `path` (unless `force`) or to write
    where no file can be created."""
    if os.path.isdir(path):
        raise UsageError(f"{path} is a directory", "give a file name for the recording")
    if os.path.lexists(path) and not force:
        raise UsageError(f"{path} already exists",
                         f"give another file name, or {flag} to overwrite it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"cannot write {path}: directory {parent} does not exist",
                         "create the directory or give another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {path}: directory {parent} is not writable",
                         "give a path in a writable directory")


class Writer:
    """Writes one recording. Nothing is created before start(); start() creates the file
    (never over an existing one unless `force`) and writes the header; write() appends records;
    close() writes the end record. A context manager: leaving the block closes."""

    def __init__(self, path: str, *, force: bool = False, options: dict | None = None,
                 flush_s: float = 1.0, level: int = 6, flag: str = "--force"):
        check_writable(path, force, flag)
        self.path = path
        self.force = force
        self.flag = flag
        self.options = dict(options or {})
        self.flush_ns = int(flush_s * 1e9)
        self.level = level
        self.records = 0               # records written after the header (end excluded)
        self.skipped: dict[str, int] = {}
        self.header: Header | None = None
        self._f = None
        self._z = None
        self._member_ns = 0
        self._pids: set[int] = set()
        self._closed = False
        self._failed = False

    # -- file and gzip members --

    def _open(self) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if self.force else
                                                           os.O_EXCL)
        try:
            fd = os.open(self.path, flags, 0o644)
        except FileExistsError:
            raise UsageError(f"{self.path} already exists",
                             f"give another file name, or {self.flag} to overwrite it") from None
        except OSError as e:
            raise UsageError(f"cannot write {self.path}: {e.strerror}",
                             "give a path in a writable directory") from None
        self._f = os.fdopen(fd, "wb")

    def _put(self, text: str) -> None:
        if self._z is None:
            self._z = zlib.compressobj(self.level, zlib.DEFLATED, 31)  # 31: gzip wrapper
            self._member_ns = time.monotonic_ns()
        data = self._z.compress(text.encode())
        if data:
            self._write(data)

    def _write(self, data: bytes, flush: bool = False) -> None:
        try:
            self._f.write(data)
            if flush:
                self._f.flush()
        except OSError as e:  # disk full, quota, I/O error: what is in the file stays readable
            self._failed = True
            raise OtelwaterError(f"cannot write the recording {self.path}: "
                                 f"{e.strerror or e}", "free space or record to another "
                                 "file; `otelwater correlate` reads what was written") from None

    def _line(self, d: dict) -> None:
        self._put(json.dumps(d, separators=(",", ":")) + "\n")

    def flush(self, end_member: bool = False) -> None:
        """Make everything written so far readable from the file: end the gzip member when it
        is `flush_s` old (or `end_member`), else a zlib sync flush (a few bytes)."""
        if self._z is None:
            return
        if end_member or time.monotonic_ns() - self._member_ns >= self.flush_ns:
            data = self._z.flush(zlib.Z_FINISH)
            self._z = None
        else:
            data = self._z.flush(zlib.Z_SYNC_FLUSH)
        self._write(data, flush=True)

    # -- the recording --

    def start(self, start_ns: int, *, config: dict | None = None,
              pids: Iterable[int] = ()) -> Header:
        """Create the file and write the header; `start_ns` is the CLOCK_MONOTONIC moment from
        which reads are seen whole (the live analysis's start), `pids` the processes to
        describe now (others are described when a record first names them)."""
        clock = measure_clock()
        processes = {}
        for pid in sorted(set(pids)):
            processes[pid] = process_info(pid)
            self._pids.add(pid)
        self.header = Header(version=VERSION, start_ns=start_ns,
                             started_wall_ns=start_ns + clock["realtime_minus_monotonic_ns"],
                             clock=clock, host=host_identity(), otelwater_version=__version__,
                             options=self.options, config=config or {}, processes=processes)
        self._open()
        self._line(self.header.to_json())
        self.flush(end_member=True)
        return self.header

    def write(self, records: Iterable) -> None:
        """Append raw records (snapshots, reads, lost, notices) in the order given; a process
        first named here is described just before its first record. Flushes (see flush())."""
        if self._f is None:
            raise RuntimeError("Writer.write() before start()")
        out: list[str] = []
        line = out.append
        dumps = json.dumps
        pids = self._pids
        for r in records:
            kind = RECORD_TYPES.get(type(r))
            if kind is None:
                name = type(r).__name__
                self.skipped[name] = self.skipped.get(name, 0) + 1
                continue
            pid = getattr(r, "pid", 0)
            if pid and pid not in pids and kind != "process":
                pids.add(pid)
                ts = getattr(r, "ts_ns", None) or getattr(r, "ts_end_ns", None)
                line(dumps(process_info(pid, ts, getattr(r, "comm", None)).to_json(),
                           separators=(",", ":")))
            line(dumps(r.to_json(), separators=(",", ":")))
        if out:
            self.records += len(out)
            out.append("")
            self._put("\n".join(out))
            self.flush()

    def close(self) -> None:
        """Write the end record and close the file (nothing to do if start() never ran)."""
        if self._closed:
            return
        self._closed = True
        if self._f is None:
            return
        if self._failed:  # no end record after a failed write: the file reads as cut there
            try:
                self._f.close()
            except OSError:
                pass
            return
        try:
            self._line({"type": "end", "ts_ns": time.monotonic_ns(), "wall_ns": time.time_ns(),
                        "records": self.records, "clock": measure_clock(),
                        "skipped": dict(self.skipped)})
            self.flush(end_member=True)
            os.fsync(self._f.fileno())
        finally:
            try:
                self._f.close()
            except OSError:
                pass

    @property
    def size(self) -> int:
        try:
            return os.path.getsize(self.path)
        except OSError:
            return 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- the reader ---------------------------------------------------------------------------------

class Reader:
    """Reads a recording back: `header` on opening (RecordingError if the file is not one), then
    iteration yields the records as the same dataclasses (WaterSnapshot, ReadRecord, LostEvents,
    Notice, ProcessInfo). A malformed or cut file raises RecordingError("FILE: record N: ...")
    after every valid record before it; `record` then holds N. `end` is the end record (dict)
    once read; `records` counts the lines read so far (header and end included)."""

    CHUNK = 1 << 16

    def __init__(self, path: str):
        self.path = path
        self.records = 0
        self.end: dict | None = None
        try:
            self._f = open(path, "rb")
        except FileNotFoundError:
            raise RecordingError(f"{path}: no such file",
                                 "give the path of a recording (otelwater record -o FILE)") \
                from None
        except OSError as e:
            raise RecordingError(f"{path}: cannot read it: {e.strerror}",
                                 "check the path and its permissions") from None
        self._lines = self._split()
        first = next(self._lines, None)
        if first is None:
            self._raise(1, "the file is empty: no header (the recorder stopped before it "
                        "started?)", FIX_CUT)
        try:
            self.header = header_from_json(self._parse(first))
        except _Bad as e:
            self._lines.close()
            self._raise(1, str(e), "upgrade otelwater" if "format version" in str(e)
                        else FIX_BAD)

    def _raise(self, n: int, what: str, fix: str):
        err = RecordingError(f"{self.path}: record {n}: {what}", fix)
        err.record = n
        raise err

    def _split(self) -> Iterator[bytes]:
        """The decompressed lines, each counted in `records` as it is handed out."""
        f = self._f
        z = None
        partial = b""
        try:
            while True:
                chunk = f.read(self.CHUNK)
                if not chunk:
                    break
                data = chunk
                while data:
                    if z is None:
                        z = zlib.decompressobj(31)
                    try:
                        out = z.decompress(data)
                    except zlib.error as e:
                        self._raise(self.records + 1, f"corrupt compressed data ({e})", FIX_BAD)
                    if out:
                        lines = (partial + out).split(b"\n")
                        partial = lines.pop()
                        for line in lines:
                            self.records += 1
                            yield line
                    if z.eof:
                        data = z.unused_data
                        z = None
                    else:
                        data = b""
        finally:
            f.close()
        if partial or z is not None:
            self._raise(self.records + 1, "the file ends inside this record: cut short (the "
                        "recorder killed, or the disk full?)", FIX_CUT)

    def _parse(self, line: bytes) -> dict:
        try:
            d = json.loads(line)
        except ValueError:
            text = line[:40].decode(errors="replace")
            raise _Bad(f"not JSON: {text!r}") from None
        if type(d) is not dict:
            raise _Bad("not a JSON object")
        return d

    def __iter__(self) -> Iterator:
        parse = self._parse
        fast = fast_record
        for line in self._lines:
            if self.end is not None:
                self._raise(self.records, "a record after the end record", FIX_BAD)
            rec = fast(line)
            if rec is not None:
                yield rec
                continue
            n = self.records
            try:
                d = parse(line)
                kind = d.get("type")
                make = FROM_JSON.get(kind) if type(kind) is str else None  # [] is unhashable
                if make is None:
                    if kind == "end":
                        self.end = d
                        continue
                    raise _Bad(f"unknown record type {kind!r}" if kind is not None
                               else "a record without a type")
                rec = make(d)
            except _Bad as e:
                self._raise(n, str(e), FIX_BAD)
            yield rec
        if self.end is None:
            self._raise(self.records + 1, "no end record: cut short (the recorder killed, or "
                        "the disk full?)", FIX_CUT)

    def close(self) -> None:
        self._lines.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
