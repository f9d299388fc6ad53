"""The socket key: pinned values (bpf/sockkey.h must compute the same; the integration tests
compare the kernel's keys with these functions on live sockets) and its invariants."""

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from otelwater.sockkey import (addr16, addr_text, fnv1a64, format_key, key_bytes, parse_key,
                               sock_key)


def test_fnv1a64_reference_vectors():
    # published FNV-1a 64-bit test vectors
    assert fnv1a64(b"") == 0xCBF29CE484222325
    assert fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a64(b"foobar") == 0x85944171F73967E8


def test_pinned_keys():
    # changing the definition breaks every recording: these values must never move
    assert sock_key(4026531840, "127.0.0.1", 8080, "127.0.0.1", 40000) == 0x13AF599DAAE49924
    assert sock_key(1, "::1", 1, "2001:db8::5", 65535) == 0x74830B4CFCD2C99D


def test_layout_of_the_hashed_bytes():
    b = key_bytes(0x01020304, "10.0.0.1", 0x1122, "::1", 0x3344)
    assert len(b) == 40
    assert b[:8] == bytes([4, 3, 2, 1, 0x22, 0x11, 0x44, 0x33])
    assert b[8:24] == bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 1])
    assert b[24:40] == bytes(15) + b"\x01"


@given(st.integers(0, 2**32 - 1), st.ip_addresses(v=4), st.integers(0, 65535),
       st.ip_addresses(v=4), st.integers(0, 65535))
def test_ipv4_and_its_mapped_ipv6_form_meet(ns, la, lp, ra, rp):
    mapped = lambda a: ipaddress.IPv6Address("::ffff:" + str(a))  # noqa: E731
    assert sock_key(ns, la, lp, ra, rp) == sock_key(ns, mapped(la), lp, mapped(ra), rp)
    assert sock_key(ns, la, lp, ra, rp) == sock_key(ns, la.packed, lp, ra.packed, rp)


@given(st.integers(0, 2**32 - 1), st.ip_addresses(), st.integers(0, 65535),
       st.ip_addresses(), st.integers(0, 65535))
def test_direction_matters_and_text_round_trips(ns, la, lp, ra, rp):
    k = sock_key(ns, la, lp, ra, rp)
    assert parse_key(format_key(k)) == k
    assert len(format_key(k)) == 16
    if (addr16(la), lp) != (addr16(ra), rp):  # an IPv4 address and its mapped form are one
        assert k != sock_key(ns, ra, rp, la, lp)
    shown = addr_text(addr16(la))
    assert shown == str(getattr(la, "ipv4_mapped", None) or la)
