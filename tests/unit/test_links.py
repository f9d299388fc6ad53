"""The request a read served, from the bytes the kernel copied out of its goroutine's labels
(otelwater/events/links.py): linked only when both ids parse, never through a goroutine that
owns a connection, and a reason whenever labels were there but no link was made."""

from __future__ import annotations

import random

import pytest

from otelwater.events import links as L
from otelwater.events.layout import Header

HEX = LINK = L.LinkKeys()
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


def pad(text: str) -> bytes:
    return text.encode()[:L.VALUE_MAX].ljust(L.VALUE_MAX, b"\0")


def got(keys, trace_text=None, span_text=None, go_start="main.handler.func1", extra=0):
    """decode() of what the kernel would copy for labels holding these texts (None: absent)."""
    flags = L.LABELS | extra
    values, lengths = [bytes(L.VALUE_MAX)] * 2, [0, 0]
    for i, text in enumerate((trace_text, span_text)):
        if text is not None:
            flags |= (L.FOUND0, L.FOUND1)[i]
            values[i], lengths[i] = pad(text), len(text.encode())
    return L.decode(keys, flags, tuple(values), tuple(lengths), go_start)


def test_hex_labels_link_the_read_to_its_request():
    assert got(HEX, TRACE, SPAN) == (TRACE, SPAN, "")
    assert got(HEX, TRACE.upper(), SPAN.upper()) == (TRACE, SPAN, "")
    # a 64-bit trace id (16 digits) is zero-padded on the left, as W3C says
    assert got(HEX, SPAN, SPAN) == ("0" * 16 + SPAN, SPAN, "")


def test_no_labels_no_link_and_nothing_to_say():
    assert L.decode(HEX, 0, (b"", b""), (0, 0), "main.main") == ("", "", "")


@pytest.mark.parametrize("trace,span,why", [
    (None, SPAN, "no label 'trace_id'"),
    (TRACE, None, "no label 'span_id'"),
    (None, None, "no label 'trace_id' or 'span_id'"),
    ("0" * 32, SPAN, "not a hex trace id"),          # all zero: invalid
    (TRACE, "0" * 16, "not a hex span id"),
    (TRACE[:-1] + "g", SPAN, "not a hex trace id"),
    (TRACE, SPAN + "0", "not a hex span id"),        # 17 digits
    (TRACE + " ", SPAN, "not a hex trace id"),
    ("x" * 70, SPAN, "too long"),                    # longer than the kernel copies
])
def test_a_label_that_does_not_parse_says_so_and_links_nothing(trace, span, why):
    t, s, note = got(HEX, trace, span)
    assert (t, s) == ("", "") and why in note


def test_a_malformed_value_is_shown_in_the_note():
    assert got(HEX, "xyz", SPAN)[2] == "label 'trace_id' is not a hex trace id ('xyz')"
    note = got(HEX, TRACE, "q" * 60)[2]
    assert note.endswith("('" + "q" * 37 + "...')")


def test_more_labels_than_scanned_is_said():
    assert "among the first 16" in got(HEX, None, SPAN, extra=L.MORE)[2]


def test_unreadable_labels_link_nothing():
    assert got(HEX, TRACE, SPAN, extra=L.UNREADABLE) == (
        "", "", "the goroutine's labels could not be read")


@pytest.mark.parametrize("start", [
    "net/http.(*persistConn).readLoop", "net/http.(*connReader).backgroundRead",
    "google.golang.org/grpc/internal/transport.(*http2Client).reader",
    "golang.org/x/net/http2.(*ClientConn).readLoop",
    # `go pconn.readLoop()` starts at a wrapper named after dialConn (Go 1.19; 1.21+)
    "net/http.(*Transport).dialConn.func5", "net/http.(*Transport).dialConn.gowrap2",
    "net/http.(*connReader).startBackgroundRead.gowrap1",
    "net/http/internal/http2.(*serverConn).serve.gowrap1"])
def test_a_connection_owning_goroutine_is_never_linked(start):
    # its labels are whoever created it: a finished request's, though they parse perfectly
    t, s, note = got(HEX, TRACE, SPAN, go_start=start)
    assert (t, s) == ("", "") and start in note and "creator" in note


def test_an_ordinary_goroutine_whose_name_looks_alike_is_linked():
    assert got(HEX, TRACE, SPAN, go_start="main.(*persistConn).readLoop")[:2] == (TRACE, SPAN)
    assert got(HEX, TRACE, SPAN, go_start="google.golang.org/grpc.(*Server).Serve")[0] == TRACE
    # net/http's server connection goroutine runs the handlers: their reads are linked
    assert got(HEX, TRACE, SPAN, go_start="net/http.(*Server).Serve.gowrap3")[0] == TRACE
    assert got(HEX, TRACE, SPAN, go_start="net/http.(*Transport).dialConnFor")[0] == TRACE


def test_decimal_ids():
    keys = L.LinkKeys("trace id", "span id", "decimal")
    assert got(keys, str(2**64 - 1), "255") == ("0" * 16 + "f" * 16, "00000000000000ff", "")
    assert "not a decimal trace id" in got(keys, str(2**64), "1")[2]
    assert "not a decimal span id" in got(keys, "1", "-1")[2]
    assert "not a decimal trace id" in got(keys, "0", "1")[2]


def test_traceparent_in_one_label():
    keys = L.LinkKeys("traceparent", "", "traceparent")
    assert keys.kernel_keys() == (b"traceparent", b"")
    assert got(keys, f"00-{TRACE}-{SPAN}-01") == (TRACE, SPAN, "")
    assert "not a W3C traceparent" in got(keys, f"ff-{TRACE}-{SPAN}-01")[2]
    assert "not a W3C traceparent" in got(keys, f"00-{TRACE}-{SPAN}")[2]
    assert "not a hex span id" in got(keys, f"00-{TRACE}-{'0' * 16}-01")[2]


def test_keys_are_checked():
    assert L.LinkKeys().check() == ""
    assert "longer than 32" in L.LinkKeys("k" * 33).check()
    assert "not one of" in L.LinkKeys(encoding="base64").check()
    assert L.LinkKeys("tp", "", "traceparent").check() == ""
    assert "span id" in L.LinkKeys("t", "", "hex").check()


def test_hex_ids_against_a_brute_force_reference():
    # any 1-40 character text: linked exactly when it is 16 or 32 hex digits, not all zero
    rng = random.Random(18)
    alphabet = "0123456789abcdefABCDEFxg- "
    for _ in range(3000):
        n = rng.choice([16, 32, rng.randrange(1, 41)])
        text = "".join(rng.choice(alphabet if rng.random() < 0.2 else "0123456789abcdef")
                       for _ in range(n))
        ok = (len(text) in (16, 32) and all(c in "0123456789abcdefABCDEF" for c in text)
              and set(text) != {"0"})
        trace, span, note = got(HEX, text, SPAN)
        assert bool(trace) == ok and bool(note) == (not ok), text
        if ok:
            assert trace == text.lower().rjust(32, "0")


def test_headers_with_two_dimensional_arrays():
    h = Header("#define N 2\n#define M 3\nstruct s { u8 a[N][M]; u16 b; };")
    s = h.structs["s"]
    assert s.a.size == 6 and s.b.offset == 6
    assert len(s().a) == 2 and len(s().a[0]) == 3
