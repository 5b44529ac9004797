"""The address policy of image downloads: which IP addresses may be connected to.

Pure functions, no I/O. `processors.gathering` applies them to every IP literal of a
URL and to every address a host name resolves to, on every redirect hop.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Protocol


class AddressLimits(Protocol):
    """The switches of the policy (`processors.gather_limits.GatherLimits` has them)."""

    @property
    def allow_loopback(self) -> bool:
        """Whether loopback addresses (127.0.0.0/8, ::1) are allowed."""
        ...

    @property
    def allow_private(self) -> bool:
        """Whether private and other non-global unicast addresses are allowed (link-local never)."""
        ...


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052 well-known prefix
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated ::a.b.c.d (RFC 4291)
_IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")  # SIIT ::ffff:0:a.b.c.d
# A host made only of numeric labels (decimal, 0-prefixed octal, 0x hex), as
# inet_aton reads it: "127.1", "2130706433", "0177.0.0.1", "0x7f.0.0.1".
_NUMERIC_HOST_RE = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]+)){0,3}\.?$", re.I)


def embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv6 address carries, and the form's name; None if none.

    IPv4-mapped `::ffff:a.b.c.d`, SIIT-translated `::ffff:0:a.b.c.d`, 6to4 `2002:AABB:CCDD::/48`,
    NAT64 `64:ff9b::a.b.c.d`, Teredo `2001:0::/32` (the client, the inverted last 32 bits)
    and IPv4-compatible `::a.b.c.d` (`::` and `::1` are themselves, not IPv4).
    """
    if ip.ipv4_mapped is not None:
        return "IPv4-mapped", ip.ipv4_mapped
    if ip.sixtofour is not None:
        return "6to4", ip.sixtofour
    if ip.teredo is not None:
        return "Teredo", ip.teredo[1]
    low = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _NAT64:
        return "NAT64", low
    if ip in _IPV4_TRANSLATED:
        return "IPv4-translated", low
    if ip in _IPV4_COMPATIBLE and int(ip) > 1:
        return "IPv4-compatible", low
    return None


def non_canonical_ipv4(host: str) -> bool:
    """Whether `host` is an IPv4 address spelled other than as a dotted quad.

    Resolvers read `127.1`, `2130706433`, `0177.0.0.1` or `0x7f.0.0.1` as IPv4
    (inet_aton), so such hosts are refused outright instead of being resolved.
    """
    if not _NUMERIC_HOST_RE.match(host):
        return False
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return True
    return False


def address_refusal(address: str, limits: AddressLimits) -> str | None:
    """Why `address` (an IP literal) may not be fetched from, or None when it may.

    An IPv6 address that embeds an IPv4 address (see `embedded_ipv4`) is judged as
    that IPv4 address, and the reason names the form. Loopback and private ranges
    can be allowed by `limits`; link-local (cloud metadata services), multicast,
    reserved and unspecified addresses never are. Anything else that is not globally
    routable (e.g. carrier-grade NAT) counts as private.
    """
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address)
    except ValueError:
        return f"{address!r} is not an IP address"
    via = ""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = embedded_ipv4(ip)
        if embedded is not None:
            via = f" ({embedded[0]} {ip} embeds {embedded[1]})"
            ip = embedded[1]
    reason = _ip_refusal(ip, limits)
    return None if reason is None else reason + via


def _ip_refusal(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, limits: AddressLimits
) -> str | None:
    if ip.is_loopback:
        return None if limits.allow_loopback else "loopback address"
    if ip.is_unspecified:
        return "unspecified address"
    if ip.is_link_local:
        return "link-local address"
    if ip.is_multicast:
        return "multicast address"
    if ip.is_reserved:
        return "reserved address"
    if ip.is_private or not ip.is_global:
        return None if limits.allow_private else "private address"
    return None


__all__ = ["AddressLimits", "address_refusal", "embedded_ipv4", "non_canonical_ipv4"]
