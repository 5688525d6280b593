"""TCP addresses: parsing HOST:PORT and opening listeners with errors a user can act on."""

from __future__ import annotations

import errno
import socket


class AddressError(ValueError):
    """An address option is invalid or cannot be used; the message says what to pass."""


def parse_host_port(text: str, option: str = "--listen") -> tuple[str, int]:
    """Parse ``HOST:PORT`` or ``[IPV6]:PORT`` into (host, port)."""
    value = text.strip()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise AddressError(f"invalid address {text!r} for {option}: expected [IPV6]:PORT, for example [::1]:8080")
        port_text = rest[1:]
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or not host:
            raise AddressError(f"invalid address {text!r} for {option}: expected HOST:PORT, for example 127.0.0.1:8080")
        if ":" in host:
            raise AddressError(f"invalid address {text!r} for {option}: put an IPv6 host in brackets, for example [::1]:8080")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise AddressError(f"invalid port {port_text!r} in {text!r} for {option}: expected a number from 0 to 65535")
    return host, int(port_text)


def open_tcp_listener(host: str, port: int, backlog: int) -> socket.socket:
    """Bind, listen and return a non-blocking TCP socket; port 0 picks a free port."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise AddressError(f"cannot resolve listen host {host!r}: {exc.strerror}; pass an IP address such as 127.0.0.1") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise AddressError(f"port {port} on {host} is already in use; pass --listen {host}:PORT with a free port") from None
        if exc.errno == errno.EACCES:
            raise AddressError(f"no permission to listen on port {port}; pass a port above 1023") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise AddressError(f"address {host} is not on this machine; pass --listen 127.0.0.1:{port}") from None
        raise AddressError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock
