"""Which TCP addresses a set of processes listens on, read from Linux /proc (no ss/netstat needed)."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

LISTEN = "0A"


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[len("socket:["):-1])
    except OSError:
        pass  # the process has gone
    return inodes


def _address(hex_ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_ip)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])  # one little-endian word
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))  # four of them
    address = ipaddress.IPv6Address(words)
    return address.ipv4_mapped or address


def listening_addresses(pids) -> dict[int, set]:
    """``{pid: {(ip_address, port), ...}}`` of the TCP sockets each process listens on."""
    owner = {inode: pid for pid in pids for inode in _socket_inodes(pid)}
    found: dict[int, set] = {pid: set() for pid in pids}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == LISTEN and inode in owner:
                ip, port = local.split(":")
                found[owner[inode]].add((_address(ip), int(port, 16)))
    return found
