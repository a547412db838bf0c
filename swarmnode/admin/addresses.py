"""Parsing 'host:port' listen addresses and telling loopback ones apart."""

from __future__ import annotations

import ipaddress

from swarmnode.config import ConfigError


def split_host_port(address: str, what: str = "address") -> tuple[str, int]:
    """'127.0.0.1:7500' -> ('127.0.0.1', 7500); '[::1]:0' -> ('::1', 0). Raises ConfigError."""
    host, sep, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(
            f"{what}: expected HOST:PORT such as 127.0.0.1:7500 (port 0 = any free port), got {address!r}"
        )
    return host, int(port_text)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """True for 'localhost' and loopback IPs; False for everything else, wildcards included."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
