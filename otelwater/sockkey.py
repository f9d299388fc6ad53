"""The socket key: the one value on which kernel snapshots, Go reads and recordings meet.

Definition (the same in ``bpf/sockkey.h``; ``tests/unit/test_sockkey.py`` pins it):

    sock_key = FNV-1a-64 over these 40 bytes, in this order
        netns   u32 little-endian   inode number of the network namespace (/proc/PID/ns/net)
        lport   u16 little-endian   local port, host order value
        rport   u16 little-endian   remote port, host order value
        laddr   16 bytes            local address as IPv6; IPv4 as ::ffff:a.b.c.d
        raddr   16 bytes            remote address, same form

FNV-1a-64: h = 0xcbf29ce484222325; for each byte b: h = (h ^ b) * 0x100000001b3 mod 2**64.

So a socket seen from the kernel (``struct sock``), from ``/proc/PID/net/tcp6`` or from ``ss``
gets the same key, for IPv4, IPv6 and v4-mapped IPv6 sockets alike. Keys are shown as 16 hex
digits (``format_key``) because JSON numbers lose precision above 2**53.
"""

from __future__ import annotations

import ipaddress
import struct

FNV64_OFFSET = 0xCBF29CE484222325
FNV64_PRIME = 0x100000001B3
_MASK64 = (1 << 64) - 1


def fnv1a64(data: bytes) -> int:
    h = FNV64_OFFSET
    for b in data:
        h = ((h ^ b) * FNV64_PRIME) & _MASK64
    return h


def addr16(addr: str | bytes | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """An address as the 16 bytes the key uses (IPv4 → ::ffff:a.b.c.d)."""
    if isinstance(addr, bytes):
        if len(addr) == 4:
            return b"\x00" * 10 + b"\xff\xff" + addr
        if len(addr) == 16:
            return addr
        raise ValueError(f"address must be 4 or 16 bytes, got {len(addr)}")
    ip = ipaddress.ip_address(addr) if isinstance(addr, str) else addr
    if ip.version == 4:
        return b"\x00" * 10 + b"\xff\xff" + ip.packed
    return ip.packed


def key_bytes(netns: int, laddr, lport: int, raddr, rport: int) -> bytes:
    return struct.pack("<IHH", netns, lport, rport) + addr16(laddr) + addr16(raddr)


def sock_key(netns: int, laddr, lport: int, raddr, rport: int) -> int:
    """The socket key of one TCP socket (see the module docstring)."""
    return fnv1a64(key_bytes(netns, laddr, lport, raddr, rport))


def format_key(key: int) -> str:
    return f"{key:016x}"


def parse_key(text: str) -> int:
    return int(text, 16)


def addr_text(raw16: bytes) -> str:
    """Human form of a 16-byte key address: IPv4-mapped addresses print as plain IPv4."""
    ip = ipaddress.IPv6Address(raw16)
    return str(ip.ipv4_mapped) if ip.ipv4_mapped else str(ip)
