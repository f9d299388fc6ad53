"""/proc-side socket facts agree with the socket API (no root needed)."""

import os
import socket

from otelwater.hostsockets import fd_sock_keys, netns_inode, ports_in_use, socket_inodes
from otelwater.sockkey import sock_key


def test_fd_sock_keys_match_getsockname():
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        srv = socket.socket(family)
        srv.bind((host, 0))
        srv.listen()
        cli = socket.create_connection(srv.getsockname()[:2])
        acc, _ = srv.accept()
        keys = fd_sock_keys(os.getpid())
        ns = netns_inode(os.getpid())
        for s in (cli, acc):
            la, lp = s.getsockname()[:2]
            ra, rp = s.getpeername()[:2]
            assert keys[s.fileno()] == sock_key(ns, la, lp, ra, rp)
        assert srv.getsockname()[1] in ports_in_use()
        assert acc.fileno() in socket_inodes(os.getpid())
        for s in (cli, acc, srv):
            s.close()


def test_gone_process_has_no_sockets():
    assert socket_inodes(2**22 + 7) == {}
    assert fd_sock_keys(2**22 + 7) == {}
