"""Which request a slow read served: its goroutine's profiler labels, decoded (pure).

Tracing libraries put the request's trace context in the goroutine's runtime/pprof labels so
profiles can point at traces; the kernel copies the values of two label keys of a recorded
slow read's goroutine (bpf/goverdict.c, otw_read_links), with what it saw (OTW_LINK_* bits),
and the function the goroutine was started with. Here those bytes become the read's
trace_id / parent_span_id, or a reason not to link it (ReadRecord.link_note). The rule that
matters most: a wrong link is worse than none. A goroutine that owns a connection (net/http's
client readLoop, gRPC's transport reader) inherited the labels of whoever created it, so its
reads would land in that long-finished request's trace: they are never linked by labels.

Encodings (LinkKeys.encoding):
    hex          trace id in one label, 32 hex digits (16 accepted: a 64-bit id, zero-padded
                 on the left as W3C says), span id in another, 16 hex digits
    decimal      both unsigned 64-bit decimal numbers (as some tracers write ids)
    traceparent  one label holding a W3C traceparent, 00-<trace id>-<span id>-<flags>
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

ENCODINGS = ("hex", "decimal", "traceparent")
KEY_MAX = 32          # bpf/goread.h OTW_LABEL_KEY_MAX
VALUE_MAX = 64        # bpf/goread.h OTW_LABEL_VAL_MAX

# bpf/goread.h OTW_LINK_*
LABELS, FOUND0, FOUND1, MORE, UNREADABLE = 1, 2, 4, 8, 16

# Goroutines that own a connection and read it for every request made on it: their labels
# are their creator's (the request that dialed, or none), never the current request's. A
# goroutine is known by its start function (runtime.g.startpc). `go pconn.readLoop()` starts
# at a compiler wrapper named after the function holding the go statement
# (net/http.(*Transport).dialConn.func5 in Go 1.19, dialConn.gowrap2 from 1.21), so the
# readers are listed both ways: the function itself, and a prefix ending in "." that covers
# the wrappers of the function that starts it (which starts no reader of requests).
CONNECTION_OWNERS = {
    "net/http.(*persistConn).readLoop": "net/http's client connection reader",
    "net/http.(*Transport).dialConn.": "net/http's client connection reader",
    "net/http.(*connReader).backgroundRead": "net/http's server background reader",
    "net/http.(*connReader).startBackgroundRead.": "net/http's server background reader",
    "net/http.(*http2ClientConn).readLoop": "net/http's HTTP/2 client connection reader",
    "net/http.(*http2Transport).newClientConn.": "net/http's HTTP/2 client connection reader",
    "net/http.(*http2serverConn).readFrames": "net/http's HTTP/2 server frame reader",
    "net/http.(*http2serverConn).serve.": "net/http's HTTP/2 server frame reader",
    "net/http/internal/http2.(*ClientConn).readLoop": "net/http's HTTP/2 client connection reader",
    "net/http/internal/http2.(*Transport).newClientConn.": "net/http's HTTP/2 client connection "
                                                          "reader",
    "net/http/internal/http2.(*serverConn).readFrames": "net/http's HTTP/2 server frame reader",
    "net/http/internal/http2.(*serverConn).serve.": "net/http's HTTP/2 server frame reader",
    "golang.org/x/net/http2.(*ClientConn).readLoop": "x/net/http2's client connection reader",
    "golang.org/x/net/http2.(*Transport).newClientConn.": "x/net/http2's client connection reader",
    "golang.org/x/net/http2.(*serverConn).readFrames": "x/net/http2's server frame reader",
    "golang.org/x/net/http2.(*serverConn).serve.": "x/net/http2's server frame reader",
    "google.golang.org/grpc/internal/transport.": "gRPC's transport reader",
}

_HEX32 = re.compile(r"[0-9a-f]{32}\Z")
_HEX16 = re.compile(r"[0-9a-f]{16}\Z")
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


@dataclass(frozen=True)
class LinkKeys:
    """The label keys (and their encoding) that carry a request's trace context."""

    trace_key: str = "trace_id"
    span_key: str = "span_id"
    encoding: str = "hex"

    def kernel_keys(self) -> tuple[bytes, bytes]:
        """The two keys the kernel looks for (the second empty for traceparent)."""
        if self.encoding == "traceparent":
            return self.trace_key.encode(), b""
        return self.trace_key.encode(), self.span_key.encode()

    def check(self) -> str:
        """'' or what is wrong with these keys (for a usage error)."""
        if self.encoding not in ENCODINGS:
            return f"encoding {self.encoding!r} is not one of {', '.join(ENCODINGS)}"
        for k in self.kernel_keys():
            if len(k) > KEY_MAX:
                return f"label key {k.decode()!r} is longer than {KEY_MAX} bytes"
        if not self.trace_key:
            return "the trace id's label key is empty"
        if self.encoding != "traceparent" and not self.span_key:
            return "the span id's label key is empty"
        return ""


@functools.lru_cache(maxsize=4096)
def connection_owner(go_start: str) -> str:
    """What the goroutine is when it owns a connection (CONNECTION_OWNERS), else ''."""
    what = CONNECTION_OWNERS.get(go_start)
    if what is None and go_start:
        for name, text in CONNECTION_OWNERS.items():
            if name.endswith(".") and go_start.startswith(name):
                return text
    return what or ""


def _id(text: str, digits: int, encoding: str) -> str | None:
    """A trace id (32 digits) or span id (16) as lowercase hex, or None when it does not
    parse or is all zero (W3C: invalid)."""
    if encoding == "decimal":
        if not text.isdigit() or len(text) > 20:
            return None
        n = int(text)
        if n >= 1 << 64:
            return None
        out = f"{n:0{digits}x}"
    else:
        out = text.lower()
        if digits == 32 and _HEX16.match(out):
            out = "0" * 16 + out
        if not (_HEX32 if digits == 32 else _HEX16).match(out):
            return None
    return out if out.strip("0") else None


def _shown(text: str) -> str:
    """A label's value as a note shows it: quoted, at most 40 characters."""
    return repr(text if len(text) <= 40 else text[:37] + "...")


def decode(keys: LinkKeys, flags: int, values: tuple[bytes, bytes],
           lengths: tuple[int, int], go_start: str) -> tuple[str, str, str]:
    """(trace_id, parent_span_id, link_note) of a read from what the kernel copied: `flags`
    its OTW_LINK_* bits, `values` the two labels' first bytes, `lengths` their full lengths,
    `go_start` the goroutine's start function ('' unknown). Linked: both ids and no note;
    not linked: ('', '', why) when the goroutine carried labels, else ('', '', '')."""
    if not flags & LABELS:
        return "", "", ""
    owner = connection_owner(go_start)
    if owner:
        return "", "", (f"the reading goroutine is {owner} ({go_start}): its labels are its "
                        f"creator's, not this request's")
    if flags & UNREADABLE:
        return "", "", "the goroutine's labels could not be read"
    need_span = keys.encoding != "traceparent"
    missing = [k for k, bit, want in ((keys.trace_key, FOUND0, True),
                                      (keys.span_key, FOUND1, need_span))
               if want and not flags & bit]
    if missing:
        more = " among the first 16" if flags & MORE else ""
        return "", "", f"no label {' or '.join(repr(k) for k in missing)}{more}"
    texts = []
    for i in range(2 if need_span else 1):
        if lengths[i] > VALUE_MAX:
            return "", "", f"label {(keys.trace_key, keys.span_key)[i]!r} is too long"
        texts.append(values[i][:lengths[i]].decode("ascii", errors="replace"))
    if keys.encoding == "traceparent":
        m = _TRACEPARENT.fullmatch(texts[0].strip().lower())
        if m is None or m.group(1) == "ff":
            return "", "", (f"label {keys.trace_key!r} is not a W3C traceparent "
                            f"({_shown(texts[0])})")
        trace, span = _id(m.group(2), 32, "hex"), _id(m.group(3), 16, "hex")
    else:
        trace, span = _id(texts[0], 32, keys.encoding), _id(texts[1], 16, keys.encoding)
    enc = "hex" if keys.encoding == "traceparent" else keys.encoding
    if trace is None:
        return "", "", f"label {keys.trace_key!r} is not a {enc} trace id ({_shown(texts[0])})"
    if span is None:
        key, text = ((keys.trace_key, texts[0]) if keys.encoding == "traceparent"
                     else (keys.span_key, texts[1]))
        return "", "", f"label {key!r} is not a {enc} span id ({_shown(text)})"
    return trace, span, ""
