"""The view and the report lead with the answer: per process, where the slow reads' time went
(the kernel's exact VerdictCounts for totals, the verdict records for the split by peer), the
CALLER as the first frame of the application's code, idle reads alike folded into one row, what
--record-rate cut, the closing line's exact counts, and the plot's marks sized by wait."""

from __future__ import annotations

import dataclasses
import io
import re

import pytest
from rich.console import Console

from otelwater.config import Config
from otelwater.events.model import ReadRecord, VerdictCounts, WaterSnapshot
from otelwater.events.recording import ProcessInfo, Writer
from otelwater.events.verdict import Verdict
from otelwater.export.live import (RunStats, ViewSink, WaitBook, WaterBoard, caller,
                                   is_app_frame, render, short_func)
from otelwater import report

MS = 1_000_000
T0 = 50_000 * MS

# -- real stacks (otelwater watch --json on examples/httpchain, Go 1.23, and examples/pgclient:
#    lib/pq through database/sql, Go 1.19), innermost first, as the kernel sends them --------

READ = ("internal/runtime/syscall.Syscall6", "syscall.Syscall", "syscall.read",
        "internal/poll.(*FD).Read", "net.(*netFD).Read", "net.(*conn).Read",
        "net.(*TCPConn).Read")
SERVER_KEEPALIVE = READ + (          # a net/http server waiting for the next request
    "net/http.(*connReader).Read", "bufio.(*Reader).fill", "bufio.(*Reader).Peek",
    "net/http.(*conn).serve", "net/http.(*Server).Serve.gowrap3", "runtime.goexit.abi0")
CLIENT_READLOOP = READ + (           # a Transport's own goroutine waiting for a response
    "net/http.(*persistConn).Read", "bufio.(*Reader).fill", "bufio.(*Reader).Peek",
    "net/http.(*persistConn).readLoop", "net/http.(*Transport).dialConn.gowrap2",
    "runtime.goexit.abi0")
HANDLER_BODY = READ + (              # a handler reading its downstream's response body
    "net/http.(*persistConn).Read", "bufio.(*Reader).Read", "io.(*LimitedReader).Read",
    "net/http.(*body).readLocked", "net/http.(*body).Read", "net/http.(*bodyEOFSignal).Read",
    "main.drain", "main.runAPI.func2", "net/http.HandlerFunc.ServeHTTP",
    "net/http.(*ServeMux).ServeHTTP", "net/http.serverHandler.ServeHTTP",
    "net/http.(*conn).serve", "net/http.(*Server).Serve.gowrap3", "runtime.goexit.abi0")
PQ_QUERY = ("runtime/internal/syscall.Syscall6", "syscall.Syscall", "syscall.read",
            "internal/poll.(*FD).Read", "net.(*netFD).Read", "net.(*conn).Read",
            "bufio.(*Reader).Read", "io.ReadAtLeast", "github.com/lib/pq.(*conn).recvMessage",
            "github.com/lib/pq.(*conn).recv1Buf", "github.com/lib/pq.(*conn).simpleExec",
            "github.com/lib/pq.(*conn).Exec", "github.com/lib/pq.(*conn).ExecContext",
            "database/sql.ctxDriverExec", "database/sql.(*DB).execDC.func2",
            "database/sql.withLock", "database/sql.(*DB).execDC", "database/sql.(*DB).exec",
            "database/sql.(*DB).ExecContext", "main.worker", "main.main.func1",
            "main.main.func2", "runtime.goexit.abi0")
SLOWREADER = ("runtime/internal/syscall.Syscall6", "syscall.Syscall", "syscall.read",
              "internal/poll.(*FD).Read", "net.(*netFD).Read", "net.(*conn).Read",
              "main.readOnce", "main.handleConn", "main.main.func4", "runtime.goexit.abi0")


@pytest.mark.parametrize("stack, want", [
    (HANDLER_BODY, "main.drain"),                       # not net/http.(*persistConn).Read
    (PQ_QUERY, "main.worker"),                          # the application, past lib/pq
    (SLOWREADER, "main.readOnce"),
    # no application frame at all: the first frame above the read machinery, as before
    (SERVER_KEEPALIVE, "net/http.(*connReader).Read"),
    (CLIENT_READLOOP, "net/http.(*persistConn).Read"),
    # no frame of main but its goroutine's start: the library the application called
    (PQ_QUERY[:12] + ("main.main.func1", "runtime.goexit.abi0"),
     "github.com/lib/pq.(*conn).recvMessage"),
    # the user's own module, started from main.main
    (READ + ("golang.org/x/net/http2.(*Framer).ReadFrame",
             "github.com/acme/api/rpc.(*Client).roundTrip", "main.main.func3"),
     "github.com/acme/api/rpc.(*Client).roundTrip"),
    (READ + ("crypto/tls.(*Conn).Read", "main.main"), "main.main"),
    ((), "?"),
])
def test_the_caller_is_the_first_frame_of_the_applications_code(stack, want):
    assert caller(stack) == want


def test_what_counts_as_the_applications_code():
    app = ["main.handler", "main.(*srv).read.func1", "github.com/lib/pq.(*conn).recv",
           "main.Pool[go.shape.string,github.com/x/y.T].Get",
           "gopkg.in/yaml%2ev3.(*parser).parse", "example/internal/db.Query"]
    plumbing = ["runtime.gopark", "net/http.(*persistConn).readLoop", "bufio.(*Reader).fill",
                "crypto/tls.(*Conn).Read", "internal/poll.(*FD).Read", "io.ReadFull",
                "golang.org/x/net/http2.(*Framer).ReadFrame", "vendor/golang.org/x/net/x.F",
                "database/sql.(*DB).QueryContext", "slices.Sort[...]", "0x4a3b2c",
                "__libc_read", "type:.eq.main.T", "slices.Index[go.shape.[]main.T]", ""]
    assert [f for f in app if not is_app_frame(f)] == []
    assert [f for f in plumbing if is_app_frame(f)] == []
    assert short_func("github.com/lib/pq.(*conn).recvMessage") == "pq.(*conn).recvMessage"
    assert short_func("main.drain") == "main.drain"


# -- a recording of a keep-alive service: reads with roles and peers, the kernel's counts -----

def rd(start, end, *, pid=1234, goid=7, fd=5, key=0xA1, role="dialed", peer=("10.0.0.5", 5432),
       send=None, prev=None, arrival=None, parked=True, qd=None, kv=None, stack=HANDLER_BODY,
       comm="api"):
    return ReadRecord(start, end, pid, pid, goid, fd, key, 4096, 64, stack, "tracepoint", comm,
                      parked, arrival, qd, None if qd is None else True, role, peer[0], peer[1],
                      send, prev, kv)


def peer_read(t, wait, *, idle=MS, **kw):
    """A dialed read that waits `idle` before our request goes out, then `wait` for the peer."""
    return rd(t, t + idle + wait + 100_000, send=t + idle, arrival=t + idle + wait,
              kv="peer-starved", **kw)


def counts(verdict, reads, wait_ns, *, role="dialed", cut=0, recorded=None, pid=1234, ts=None):
    return VerdictCounts(ts or T0 + 900 * MS, pid, role, verdict, reads,
                         reads - cut if recorded is None else recorded, cut, wait_ns, wait_ns)


def keepalive_run():
    """pid 1234 "api": 4 reads waiting for 10.0.0.5:5432 (30 ms each), 1 for 10.0.0.6:6379
    (8 ms), 1 for a client mid-request (accepted, 5 ms), 1 runtime-starved (4 ms to run),
    1 consumer-lagging (7 ms queued), 6 idle reads on accepted sockets (5 goroutines, one
    caller; 100 ms of think time each); the kernel counted 10 peer-starved dialed reads (6 cut
    by --record-rate), and 15,020 idle. pid 2000 "worker": verdicts only (no kernel counts)."""
    t = T0 + 10 * MS
    recs = [ProcessInfo(1234, T0, "/srv/bin/api", "api", ("api",), None, None, None),
            ProcessInfo(2000, T0, "/srv/bin/worker", "worker", ("worker",), None, None, None)]
    for i in range(4):
        recs.append(peer_read(t + i * 40 * MS, 30 * MS, goid=10 + i, key=0xB0 + i))
    recs.append(peer_read(t + 200 * MS, 8 * MS, goid=20, key=0xC0, peer=("10.0.0.6", 6379)))
    recs.append(rd(t + 220 * MS, t + 225 * MS, goid=21, key=0xC1, role="accepted",
                   peer=("10.0.0.9", 40001), send=t, prev=t + 210 * MS,
                   arrival=t + 225 * MS - 50_000, kv="peer-starved", stack=SERVER_KEEPALIVE))
    a = t + 240 * MS
    recs.append(rd(t + 230 * MS, a + 4 * MS, goid=22, key=0xC2, send=t + 231 * MS, arrival=a,
                   kv="runtime-starved"))
    recs.append(rd(t + 250 * MS, t + 250 * MS, goid=23, key=0xC3, parked=False, qd=7 * MS,
                   kv="consumer-lagging"))
    for i in range(6):
        s = t + 300 * MS + i * 10 * MS
        recs.append(rd(s, s + 100 * MS, goid=30 + i % 5, fd=9 + i % 5, key=0xD0 + i % 5,
                       role="accepted", peer=("10.0.0.7", 50000 + i), send=s - MS,
                       prev=s - 2 * MS, arrival=s + 100 * MS - 50_000, kv="idle",
                       stack=SERVER_KEEPALIVE))
    recs.append(rd(t + 500 * MS, t + 520 * MS, pid=2000, goid=3, key=0xE0, comm="worker",
                   peer=("10.0.0.8", 9000), send=t + 500 * MS, arrival=t + 519_900_000,
                   kv="peer-starved", stack=PQ_QUERY))
    recs += [counts("peer-starved", 6, 150 * MS, cut=2, ts=T0 + 400 * MS),   # replaced below
             counts("peer-starved", 10, 300 * MS, cut=6),
             counts("peer-starved", 1, 5 * MS, role="accepted"),
             counts("runtime-starved", 1, 4 * MS),
             counts("consumer-lagging", 1, 7 * MS),
             counts("idle", 15_020, 600_000 * MS, role="accepted", recorded=6)]
    return recs


def correlate(tmp_path, records, *, include_idle=False, plot=False):
    path = tmp_path / "run.otw"
    w = Writer(str(path), options={"go_pids": [1234]})
    w.start(T0, config={})
    w.write(records)
    w.close()
    config = Config()
    if include_idle:
        config = dataclasses.replace(config, correlate=dataclasses.replace(
            config.correlate, include_idle=True))
    return report.correlate(str(path), config, plot=plot)


def flat(text: str) -> str:
    """The report with its wrapped lines joined."""
    return re.sub(r"\n +", " ", text)


def block(text: str) -> list[str]:
    lines = text.splitlines()
    i = lines.index("Where the slow time went (each slow read under its verdict, with its wait)")
    return lines[i + 1:lines.index("", i)]


def test_the_report_leads_with_where_each_process_spent_its_slow_time(tmp_path):
    col = correlate(tmp_path, keepalive_run())
    text = report.render(col)
    assert text.index("Where the slow time went") < text.index("Slow reads:")
    assert block(text) == [
        # the kernel's exact totals: 10 + 1 peer-starved, 1 runtime-starved, 1 lagging
        "  pid 1234 api: 13 slow reads, 316 ms waiting",
        # the split by peer from the 8 recorded in full: 4 x 30 ms, 8 ms, 5 ms (of 133 ms)
        "    305 ms for peers: 10.0.0.5:5432 dialed 90%, 10.0.0.6:6379 dialed 6%,",
        "      10.0.0.9 accepted 4%",
        "    7.0 ms own lag (bytes stood in its queue)",
        "    4.0 ms waiting to run (run queue)",
        "    15,020 idle reads not counted as slow (600 s: the peer owed nothing, as a",
        "      client's think time or an idle keep-alive)",
        "    peers: shares of the 8 of 13 slow reads recorded in full; --record-rate kept",
        "      6 off the record",
        # no kernel counts: the records' own figures, in seconds
        "  pid 2000 worker: 1 slow read, 20 ms waiting",
        "    20 ms for peers: 10.0.0.8:9000 dialed 20 ms",
        "  exact: the kernel counted every slow read (recorded in full or not) of the",
        "    processes it traced",
    ]
    assert "6 slow reads counted but not recorded in full (--record-rate): in the counts and " \
           "totals at the top, not in the rest" in flat(text)
    # the verdict records say what they cover next to the kernel's count
    assert "  (the records; 14 with the kernel's exact counts: the figures at the top)" in text
    # the worst reads name the application's frame, the stack stays whole in --json
    assert "called by main.drain" in flat(text)
    v = next(v for _, _, v in col.worst if v.read.goid == 10)
    assert v.to_json()["stack"] == list(HANDLER_BODY)


def test_idle_reads_alike_fold_into_one_worst_read_with_their_count(tmp_path):
    text = report.render(correlate(tmp_path, keepalive_run(), include_idle=True))
    rows = [x for x in text.splitlines() if " idle" in x and x.startswith("    +")]
    assert len(rows) == 1 and "idle ×6" in rows[0], rows
    assert "idle 100.0ms run 50us" in rows[0]
    assert "the longest of 6 idle reads alike (pid 1234, accepted sockets, one caller)" in \
        flat(text)
    # idle reads are slow reads of this run: the block says they are left out of its figures
    assert "    6 idle reads left out of these" not in text          # the kernel counted 15,020
    assert " 15,020 idle reads left out of these (600 s: the peer owed nothing" in flat(text)


def test_a_recording_without_roles_or_kernel_counts_gets_the_block_from_its_records(tmp_path):
    """Older recordings: no role, peer or kernel counts: the peer is the socket's remote end
    (from the snapshots), the totals are the verdict records', and nothing is said of cuts."""
    snap = WaterSnapshot(T0 + 2 * MS, 0xAB, 77, "old", 77, 1, "127.0.0.1", 8080, "127.0.0.1",
                         5000, 1, 900, 64, 1 << 20, 0, 0, 0, "", 1, 1, "arrival", "ESTABLISHED",
                         9)
    old = [ReadRecord(T0 + MS, T0 + 4 * MS, 77, 77, 7, 3, 0xAB, 4096, 64, SLOWREADER,
                      "tracepoint", "old", True, T0 + 3_900_000, 100_000, True),
           ReadRecord(T0 + 6 * MS, T0 + 6 * MS, 77, 77, 7, 3, 0xAB, 4096, 64, SLOWREADER,
                      "tracepoint", "old", False, None, 9 * MS, True)]
    who = ProcessInfo(77, T0, None, "old", (), None, None, None)    # not this host's pid 77
    text = report.render(correlate(tmp_path, [who, snap, *old]))
    assert block(text) == ["  pid 77 old: 2 slow reads, 12 ms waiting",
                           "    9.0 ms own lag (bytes stood in its queue)",
                           "    2.9 ms for peers: 127.0.0.1:5000 2.9 ms"]
    assert "counted but not recorded" not in text and "the kernel counted" not in text
    assert "called by main.readOnce" in flat(text)


def test_the_kernel_counts_are_cumulative_the_later_replaces_the_earlier():
    book = WaitBook()
    book.add_counts(counts("peer-starved", 6, 150 * MS, cut=2))
    book.add_counts(counts("peer-starved", 10, 300 * MS, cut=6))
    book.add_counts(counts("idle", 3, 9 * MS, role="accepted"))
    [p] = book.processes()
    assert (p.exact, p.slow, p.total_ns, p.idle, p.cut) == (True, 10, 300 * MS, 3, 6)
    assert p.short() == "pid 1234 ?: 10 slow, 300ms: peers 300ms; 3 idle"


# -- the live view and the closing line ---------------------------------------------------

def verdict_of(r: ReadRecord, verdict: str, peer=None, run=None, idle=None) -> Verdict:
    return Verdict(r, verdict, "why", peer, run, r.queue_delay_ns, wait_idle_ns=idle)


def test_the_view_leads_with_each_process_and_folds_idle_goroutines():
    board = WaterBoard()
    for r in keepalive_run():
        if isinstance(r, ReadRecord):
            board.add_read(r)
        elif isinstance(r, VerdictCounts):
            board.add_counts(r)
    for i in range(4):
        r = peer_read(T0 + i * 40 * MS, 30 * MS, goid=10 + i, key=0xB0 + i)
        board.add_verdict(verdict_of(r, "peer-starved", 30 * MS, 100_000, MS))
    rows = board.reader_rows()
    idle = [(x, n) for x, n in rows if x.idle_only]
    assert [(x.pid, x.role, x.caller, n, x.idle) for x, n in idle] == \
        [(1234, "accepted", "net/http.(*connReader).Read", 5, 6)]
    assert rows[-1][0].idle_only                    # slow readers first
    peers = [x for x, _ in rows if x.last_verdict == "peer-starved" and x.pid == 1234]
    # MAX leaves the idle part out (1 ms before the request went out)
    assert sorted(x.max_ns for x in peers)[-1] == 30 * MS + 100_000
    con = Console(width=80, file=io.StringIO())
    con.print(render(board, title="otelwater watch: test"))
    out = con.file.getvalue().splitlines()
    assert out[1].startswith("pid 1234 api: 13 slow, 316ms: peers 305ms (10.0.0.5:5432 "), out
    assert "15,020 idle" in " ".join(out[1:3])
    row = next(x for x in out if "×5" in x)
    assert "IDLE" in row and "http.(*connReader).Read" in row and " 6 " in row
    assert any("main.drain" in x for x in out)


def test_the_closing_line_uses_the_kernels_exact_counts_the_idle_and_the_cut():
    stats = RunStats(out=io.StringIO())
    r = peer_read(T0, 30 * MS)
    for _ in range(3):
        stats.write([verdict_of(r, "peer-starved", 30 * MS, 100_000, MS)])
    assert stats.verdicts == {"peer-starved": 3}
    assert stats.closing_text() == "slow reads: 3 peer-starved"
    stats.write([counts("peer-starved", 192, 9 * 10**9, cut=40),
                 counts("runtime-starved", 3, 5 * MS),
                 counts("idle", 15_020, 10**12, role="accepted", recorded=0)])
    assert stats.verdicts == {"peer-starved": 192, "runtime-starved": 3}
    assert stats.closing_text() == (
        "slow reads: 192 peer-starved, 3 runtime-starved (exact, the kernel's count); 15,020 "
        "idle reads not counted as slow (the peer owed nothing); 40 slow reads counted but not "
        "recorded in full (--record-rate)")


def test_the_view_sink_takes_counts():
    sink = ViewSink(console=Console(width=80, file=io.StringIO()))
    sink.write([counts("consumer-lagging", 2, 14 * MS)])
    [p] = sink.board.book.processes()
    assert p.short() == "pid 1234 ?: 2 slow, 14ms: lag 14ms"


# -- the plot ------------------------------------------------------------------------------

def test_marks_grow_with_their_wait_on_a_log_scale():
    size = report.mark_sizes([2 * MS, 30 * MS, 900 * MS], MS)
    assert size(MS) == report.MARK_AREA[0] and size(900 * MS) == report.MARK_AREA[1]
    assert size(2 * MS) < size(30 * MS) < size(900 * MS)
    assert size.ticks == [10**6, 10**7, 10**8]
    one = report.mark_sizes([5 * MS], MS)          # a single wait: still a sane scale
    assert report.MARK_AREA[0] < one(5 * MS) < report.MARK_AREA[1]


def test_the_plot_of_a_service_whose_reads_only_wait_for_peers(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.colors import LogNorm

    scales = []
    real_init = LogNorm.__init__

    def spy(self, *a, **kw):
        scales.append((kw.get("vmin"), kw.get("vmax")))
        real_init(self, *a, **kw)

    monkeypatch.setattr(LogNorm, "__init__", spy)
    t = T0 + 10 * MS
    reads = [peer_read(t + i * 40 * MS, (5 + 10 * i) * MS, goid=10 + i, key=0xB0 + i % 2)
             for i in range(6)]
    empty = [WaterSnapshot(t + i * MS, 0xB0 + i % 2, 1234, "api", 1, 1, "10.0.0.1", 40000 + i % 2,
                           "10.0.0.5", 5432, 0, 0, 0, 1 << 20, 0, 0, 0, "", 1, 1, "read",
                           "ESTABLISHED", 9, "dialed") for i in range(2)]
    col = correlate(tmp_path, [*empty, *reads], plot=True)
    assert [m[3] for m in col.marks] == [(5 + 10 * i) * MS for i in range(6)]
    png = tmp_path / "w.png"
    assert report.plot(col, str(png)) == 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert scales and scales[0] == (1, report.WATER_SCALE_MIN)
