"""The recording format (otelwater.events.recording) and `otelwater correlate` over files:
round trips, the header, cut and malformed files, never overwriting, the report and the plot."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
import zlib

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from otelwater.cli import main
from otelwater.errors import OtelwaterError, RecordingError, UsageError
from otelwater.events.model import LostEvents, Notice, ReadRecord, WaterSnapshot
from otelwater.events.recording import (VERSION, ProcessInfo, Reader, Writer, measure_clock,
                                        parse_resource_attributes, process_info)

MS = 1_000_000
T0 = 5_000 * MS


def snap(ts, key=0xABC, unread=0, level=0, pid=0, rport=5000):
    return WaterSnapshot(ts, key, pid, "svc", 1, 4026531840, "127.0.0.1", 8080, "127.0.0.1",
                         rport, level, unread + 700 * level, unread, 1 << 20, 0, 0, 0, "",
                         123, 45, "arrival", "ESTABLISHED", 99)


def read(start, end, key=0xABC, *, parked=True, arrival=None, qd=None, pid=0, goid=7):
    return ReadRecord(start, end, pid, pid, goid, 3, key, 4096, 64,
                      ("internal/poll.(*FD).Read", "net.(*conn).Read", "main.handle"),
                      "tracepoint", "svc", parked, arrival, qd, None if qd is None else True)


def records_of_a_run():
    """Three slow reads (peer-starved, runtime-starved, consumer-lagging) with water around."""
    return [
        [snap(T0 + 1 * MS), snap(T0 + 2 * MS, unread=64, level=1)],
        [read(T0 + 1 * MS, T0 + 4 * MS, arrival=T0 + 3_900_000, qd=100_000),
         snap(T0 + 5 * MS, unread=4096, level=3)],
        [read(T0 + 6 * MS, T0 + 12 * MS, arrival=T0 + 7 * MS, qd=5 * MS),
         read(T0 + 20 * MS, T0 + 20_200_000, parked=False, qd=9 * MS),
         LostEvents(T0 + 30 * MS, "water", 0), Notice(T0 + 31 * MS, "reads", "a notice")],
    ]


def record(path, batches, *, flush_s=1.0, start_ns=T0, pids=(), **kw):
    w = Writer(str(path), flush_s=flush_s, options={"pids": list(pids)}, **kw)
    w.start(start_ns, config={"correlate": {"window_ms": 5.0}}, pids=pids)
    for b in batches:
        w.write(b)
    w.close()
    return w


def read_all(path):
    r = Reader(str(path))
    return r, list(r)


# -- round trips ---------------------------------------------------------------------------------

def test_every_record_type_and_the_header_come_back_equal(tmp_path):
    path = tmp_path / "r.otw"
    batches = records_of_a_run()
    proc = ProcessInfo(42, T0, "/bin/x", "x", ("x", "-y"), "svc", {"a": "b"}, 123)
    batches.append([proc])
    w = record(path, batches, pids=[os.getpid()])
    r, got = read_all(path)
    assert got == [x for b in batches for x in b]
    h = r.header
    assert (h.version, h.start_ns) == (VERSION, T0)
    assert h.options == {"pids": [os.getpid()]}
    assert h.config == {"correlate": {"window_ms": 5.0}}
    assert h.host["name"] and h.host["kernel"] == os.uname().release
    me = h.processes[os.getpid()]
    assert me.exe == os.path.realpath(sys.executable) and me.cmdline[0]
    assert h.started_wall_ns == T0 + h.clock["realtime_minus_monotonic_ns"]
    assert r.end["records"] == w.records == len(got)
    # it is gzip'd JSON Lines: the standard tools read it, one object per record
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    assert json.loads(lines[0])["type"] == "otelwater-recording"
    assert [json.loads(x)["type"] for x in lines[1:]] == [
        "snapshot", "snapshot", "read", "snapshot", "read", "read", "lost", "notice",
        "process", "end"]


def test_a_process_first_named_by_a_record_is_described_before_it(tmp_path):
    path = tmp_path / "r.otw"
    me = os.getpid()
    record(path, [[snap(T0, pid=me), snap(T0 + 1, pid=me), read(T0, T0 + 2, pid=me)]])
    _, got = read_all(path)
    assert isinstance(got[0], ProcessInfo) and got[0].pid == me and got[0].ts_ns == T0
    assert got[0].exe == os.path.realpath(sys.executable)
    assert sum(isinstance(x, ProcessInfo) for x in got) == 1


ints = st.integers(0, 2**63 - 1)
texts = st.text(max_size=12)
snapshots = st.builds(WaterSnapshot, ints, st.integers(0, 2**64 - 1), st.integers(0, 2**31),
                      texts, ints, ints, texts, st.integers(0, 65535), texts,
                      st.integers(0, 65535), ints, ints, ints, ints, ints, ints, ints, texts,
                      ints, ints, texts, texts, ints)
maybe_int = st.none() | ints
maybe_bool = st.none() | st.booleans()
reads = st.builds(ReadRecord, ints, ints, st.integers(0, 2**31), ints, maybe_int,
                  st.integers(-1, 2**31), st.integers(0, 2**64 - 1), ints,
                  st.integers(-4095, 2**31), st.lists(texts, max_size=4).map(tuple), texts,
                  texts, maybe_bool, maybe_int, maybe_int, maybe_bool)
others = (st.builds(LostEvents, ints, texts, ints) | st.builds(Notice, ints, texts, texts))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(snapshots | reads | others, max_size=6), max_size=5))
def test_any_records_round_trip(tmp_path_factory, batches):
    path = tmp_path_factory.mktemp("rt") / "r.otw"
    record(path, batches, flush_s=0)
    _, got = read_all(path)
    # a record naming a process (pid > 0) not seen before is preceded by its description
    assert [x for x in got if type(x) is not ProcessInfo] == [x for b in batches for x in b]


# -- cut files -----------------------------------------------------------------------------------

def recoverable_lines(data: bytes) -> int:
    """Complete lines in a gzip prefix, by the standard library's gzip (a second decoder)."""
    import io

    out = b""
    with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
        try:
            while chunk := f.read1(256):
                out += chunk
        except (EOFError, gzip.BadGzipFile):
            pass
    return out.count(b"\n")


@pytest.mark.parametrize("flush_s", [0, 60], ids=["member-per-batch", "sync-flush-per-batch"])
def test_a_cut_at_every_byte_gives_the_whole_file_or_the_error_at_the_right_record(
        tmp_path, flush_s):
    full_path = tmp_path / "full.otw"
    batches = records_of_a_run()
    record(full_path, batches, flush_s=flush_s)
    data = full_path.read_bytes()
    _, full = read_all(full_path)
    cut = tmp_path / "cut.otw"
    seen_counts = []
    for n in range(len(data) + 1):
        cut.write_bytes(data[:n])
        got, err = [], None
        r = None
        try:
            r = Reader(str(cut))
            for x in r:
                got.append(x)
        except RecordingError as e:
            err = e
        if n == len(data):
            assert err is None and got == full
            continue
        assert err is not None, f"a cut at byte {n} of {len(data)} went unnoticed"
        assert got == full[:len(got)]
        lines = recoverable_lines(data[:n])
        assert err.record == lines + 1, (n, err.message)
        assert err.message.startswith(f"{cut}: record {err.record}: ")
        assert err.exit_code == 5 and "\n" not in err.one_line()
        seen_counts.append(len(got))
    assert seen_counts == sorted(seen_counts)   # a longer prefix never yields less
    assert len(set(seen_counts)) > 2            # and the flush points let prefixes through


def test_everything_written_is_readable_before_close(tmp_path):
    # what a kill -9 leaves: every batch handed to write() is in the file
    path = tmp_path / "r.otw"
    w = Writer(str(path), flush_s=60)
    w.start(T0)
    batches = records_of_a_run()
    for i, b in enumerate(batches):
        w.write(b)
        got = []
        with pytest.raises(RecordingError, match="cut short") as e:
            for x in Reader(str(path)):
                got.append(x)
        assert got == [x for b in batches[:i + 1] for x in b]
        assert e.value.record == 2 + len(got)
    w.close()


# -- malformed files ------------------------------------------------------------------------------

def header_line(**over):
    h = {"type": "otelwater-recording", "version": 1, "start_ns": T0, "started_wall_ns": 1,
         "clock": {"realtime_minus_monotonic_ns": 10, "error_ns": 1}, "host": {},
         "otelwater_version": "0", "options": {}, "config": {}, "processes": {}}
    h.update(over)
    return json.dumps(h)


def write_lines(path, lines):
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))


GOOD = [json.dumps(snap(T0).to_json()), json.dumps(read(T0, T0 + 2 * MS).to_json())]
END = json.dumps({"type": "end", "ts_ns": T0, "records": 2})


@pytest.mark.parametrize("bad, why", [
    ("garbage {", "not JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"ts_ns": 1}', "without a type"),
    ('{"type": "bogus"}', "unknown record type 'bogus'"),
    ('{"type": "otelwater-recording", "version": 1}', "unknown record type"),
    (json.dumps({**snap(T0).to_json(), "level": "3"}), "snapshot field level is \"3\", "
     "expected an integer"),
    (json.dumps({**snap(T0).to_json(), "sock_key": "xyz"}), "field sock_key"),
    (json.dumps({**read(T0, T0).to_json(), "stack": [1]}), "expected a list of strings"),
    (json.dumps({**read(T0, T0).to_json(), "parked": 1}), "expected true or false"),
    (json.dumps({k: v for k, v in snap(T0).to_json().items() if k != "ts_ns"}),
     "snapshot record lacks field ts_ns"),
    ('{"type": "lost", "ts_ns": 1, "probe": "water", "lost_total": 1.5}', "lost_total"),
])
def test_a_bad_line_stops_the_reading_at_its_record(tmp_path, bad, why):
    path = tmp_path / "bad.otw"
    write_lines(path, [header_line(), *GOOD, bad, *GOOD, END])
    got = []
    with pytest.raises(RecordingError) as e:
        for x in Reader(str(path)):
            got.append(x)
    assert len(got) == 2                          # everything valid before it
    assert e.value.record == 4                    # header, two records, then this one
    assert e.value.message.startswith(f"{path}: record 4: ") and why in e.value.message


def test_records_after_the_end_and_a_missing_end_are_errors(tmp_path):
    path = tmp_path / "r.otw"
    write_lines(path, [header_line(), *GOOD, END, GOOD[0]])
    with pytest.raises(RecordingError, match="record 5: a record after the end"):
        list(Reader(str(path)))
    write_lines(path, [header_line(), *GOOD])
    with pytest.raises(RecordingError, match="record 4: no end record"):
        list(Reader(str(path)))


def test_a_newer_format_version_says_upgrade(tmp_path):
    path = tmp_path / "v2.otw"
    write_lines(path, [header_line(version=2), END])
    with pytest.raises(RecordingError) as e:
        Reader(str(path))
    assert e.value.message == (f"{path}: record 1: format version 2; this otelwater "
                               f"(0.1.0) reads version 1")
    assert e.value.fix == "upgrade otelwater" and e.value.exit_code == 5


@pytest.mark.parametrize("content, why", [
    (b"", "the file is empty"),
    (b'{"type": "snapshot"}\n', "corrupt compressed data"),       # `watch --json` output
    (gzip.compress(b'{"type": "snapshot"}\n'), "not an otelwater recording"),
    (gzip.compress(header_line(start_ns="x").encode() + b"\n"), "wrong type"),
    (gzip.compress(header_line(clock={}).encode() + b"\n"), "header lacks"),
    (gzip.compress(b"x" * 100)[:30], "record 1: the file ends inside this record"),
])
def test_files_that_are_no_recording_fail_at_record_1(tmp_path, content, why):
    path = tmp_path / "x"
    path.write_bytes(content)
    with pytest.raises(RecordingError) as e:
        Reader(str(path))
    assert e.value.record == 1 and why in e.value.message


def test_trailing_garbage_and_a_bad_crc_are_caught(tmp_path):
    path = tmp_path / "r.otw"
    record(path, records_of_a_run())
    data = path.read_bytes()
    path.write_bytes(data + b"junk")
    with pytest.raises(RecordingError, match="corrupt compressed data"):
        list(Reader(str(path)))
    flipped = bytearray(data)
    flipped[-6] ^= 0xFF                             # inside the last member's CRC-32
    path.write_bytes(bytes(flipped))
    with pytest.raises(RecordingError, match="corrupt compressed data"):
        list(Reader(str(path)))


# -- never overwrite ------------------------------------------------------------------------------

def test_an_existing_file_is_refused_unless_forced(tmp_path):
    path = tmp_path / "r.otw"
    path.write_text("precious")
    with pytest.raises(UsageError) as e:
        Writer(str(path))
    assert "already exists" in e.value.message and "--force" in e.value.fix
    assert path.read_text() == "precious"
    record(path, [[snap(T0)]], force=True)
    assert list(Reader(str(path))) == [snap(T0)]


def test_a_file_that_appears_before_start_is_not_overwritten(tmp_path):
    path = tmp_path / "r.otw"
    w = Writer(str(path))
    path.write_text("precious")
    with pytest.raises(UsageError, match="already exists"):
        w.start(T0)
    assert path.read_text() == "precious"


def test_nothing_is_created_before_start(tmp_path):
    path = tmp_path / "r.otw"
    with Writer(str(path)):
        pass
    assert not path.exists()
    with pytest.raises(UsageError, match="does not exist"):
        Writer(str(tmp_path / "no" / "r.otw"))
    with pytest.raises(UsageError, match="is a directory"):
        Writer(str(tmp_path))


@pytest.mark.parametrize("args", [["record", "-o"], ["watch", "--record"]])
def test_the_commands_refuse_an_existing_file_before_attaching(tmp_path, args):
    path = tmp_path / "r.otw"
    path.write_text("precious")
    r = CliRunner().invoke(main, [*args, str(path), "-d", "1"])
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == [
        f"otelwater: {path} already exists; give another file name, or --force to "
        "overwrite it"]
    assert path.read_text() == "precious"


def test_force_without_record_is_a_usage_error():
    r = CliRunner().invoke(main, ["watch", "--force", "-d", "1"])
    assert r.exit_code == 2 and "--force without --record" in r.output


def test_a_full_disk_is_one_line(tmp_path):
    w = Writer("/dev/full", force=True)
    with pytest.raises(OtelwaterError) as e:
        w.start(T0)
    assert e.value.one_line().startswith("cannot write the recording /dev/full: No space left")
    w.close()                                       # no second error while closing


# -- identity and clock ---------------------------------------------------------------------------

def test_process_identity_comes_from_proc_and_the_otel_environment(tmp_path):
    env = dict(os.environ, OTEL_SERVICE_NAME="checkout",
               OTEL_RESOURCE_ATTRIBUTES="deployment.environment=prod,team=pay%20ments")
    p = subprocess.Popen(["sleep", "30"], env=env)
    try:
        time.sleep(0.05)
        info = process_info(p.pid)
    finally:
        p.kill()
        p.wait()
    assert info.exe.endswith("sleep") and info.comm == "sleep"
    assert info.cmdline == ("sleep", "30")
    assert info.service_name == "checkout"
    assert info.resource_attributes == {"deployment.environment": "prod", "team": "pay ments"}
    with open("/proc/self/stat") as f:  # a child starts after us, within this test
        me = int(f.read().rsplit(")", 1)[1].split()[19]) * 1_000_000_000 // os.sysconf(
            "SC_CLK_TCK")
    assert me <= info.start_time
    gone = process_info(p.pid, comm="was-here")
    assert gone.exe is None and gone.comm == "was-here" and gone.start_time is None


def test_resource_attributes_are_parsed_as_the_otel_sdk_does():
    assert parse_resource_attributes("") == {}
    assert parse_resource_attributes(" a = 1 , service.name=x%2Cy ") == {"a": "1",
                                                                         "service.name": "x,y"}
    assert parse_resource_attributes("a=1,novalue") is None
    assert parse_resource_attributes("=1") is None
    assert parse_resource_attributes("a=%ff") is None


def test_clock_offset_is_within_its_error_bound():
    c = measure_clock()
    assert 0 < c["error_ns"] < 1_000_000
    m0 = time.monotonic_ns()
    r = time.time_ns()
    m1 = time.monotonic_ns()
    assert abs((r - m0) - c["realtime_minus_monotonic_ns"]) <= c["error_ns"] + (m1 - m0) + 10_000


# -- correlate over files (no root: the analysis is pure) ------------------------------------------

def correlate(*args):
    return CliRunner().invoke(main, ["correlate", *args])


def test_correlate_reports_each_verdict_within_80_columns(tmp_path):
    path = tmp_path / "r.otw"
    record(path, records_of_a_run())
    r = correlate(str(path))
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert max(map(len, lines)) <= 80
    text = r.output
    for v, n in (("peer-starved", 1), ("runtime-starved", 1), ("consumer-lagging", 1),
                 ("unknown", 0)):
        assert any(x.split()[:2] == [v, str(n)] for x in lines), v
    assert "Worst sockets" in text and "Worst reads" in text and "main.handle" in text
    assert "no records were lost" in text and "a notice" in text


def test_correlate_json_gives_every_verdict_then_summaries(tmp_path):
    path = tmp_path / "r.otw"
    record(path, records_of_a_run())
    r = correlate(str(path), "--json")
    assert r.exit_code == 0, r.output
    out = [json.loads(x) for x in r.output.splitlines()]
    verdicts = [x for x in out if x["type"] == "verdict"]
    assert [v["verdict"] for v in verdicts] == ["peer-starved", "runtime-starved",
                                               "consumer-lagging"]
    assert verdicts[1]["wait_run_ns"] == 5 * MS and verdicts[1]["wait_peer_ns"] == 1 * MS
    assert verdicts[2]["queue_delay_ns"] == 9 * MS
    assert verdicts[0]["evidence"] and verdicts[0]["evidence"][0]["type"] == "snapshot"
    kinds = [x["type"] for x in out]
    assert kinds[-1] == "correlation" and "socket_summary" in kinds
    assert kinds.index("socket_summary") > max(i for i, k in enumerate(kinds) if k == "verdict")
    last = out[-1]
    assert last["complete"] is True and last["records"]["read"] == 3


def test_correlate_takes_the_recordings_settings_unless_told(tmp_path):
    path = tmp_path / "r.otw"
    w = Writer(str(path))
    w.start(T0, config={"correlate": {"threshold_ms": 8.0, "window_ms": 5.0}})
    for b in records_of_a_run():
        w.write(b)
    w.close()
    slow = lambda r: [json.loads(x)["verdict"] for x in r.output.splitlines()  # noqa: E731
                      if json.loads(x)["type"] == "verdict"]
    assert slow(correlate(str(path), "--json")) == ["consumer-lagging"]   # 8 ms: one left
    assert len(slow(correlate(str(path), "--json", "--blocked-ms", "1"))) == 3


def test_correlate_a_cut_file_prints_what_it_has_then_one_line_and_exits_5(tmp_path):
    path = tmp_path / "r.otw"
    record(path, records_of_a_run(), flush_s=60)
    data = path.read_bytes()
    path.write_bytes(data[:-40])
    r = CliRunner().invoke(main, ["correlate", str(path)])
    assert r.exit_code == 5
    lines = r.output.splitlines()
    assert lines[-1].startswith(f"otelwater: {path}: record ")
    assert "cut short" in lines[-1] and "Traceback" not in r.output
    assert any(x.startswith("Slow reads:") for x in lines)
    assert any("CUT SHORT at record" in x for x in lines)
    rj = CliRunner().invoke(main, ["correlate", str(path), "--json"])
    assert rj.exit_code == 5
    last = json.loads(rj.output.splitlines()[-2])
    assert last["type"] == "correlation" and last["complete"] is False


def test_correlate_missing_and_foreign_files_are_one_line(tmp_path):
    r = correlate(str(tmp_path / "nope.otw"))
    assert r.exit_code == 5 and r.output.count("\n") == 1 and "no such file" in r.output
    other = tmp_path / "watch.jsonl"
    other.write_text('{"type": "snapshot"}\n')
    r = correlate(str(other))
    assert r.exit_code == 5 and r.output.count("\n") == 1 and "record 1" in r.output


def test_correlate_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "r.otw"
    record(path, records_of_a_run() + [[snap(T0 + 40 * MS, key=0xDEF, unread=9000)]])
    png = tmp_path / "water.png"
    r = correlate(str(path), "--plot", str(png))
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(2 sockets)" in r.output
