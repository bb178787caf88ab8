"""Where `bimode serve` may fetch a remote image from: not from its own network unless the operator says so, and
only from the very address that was checked.

A URL's host is resolved once and every address it resolves to must be public (`address_refused`), unless the
address is in `--allowed_media_networks` or the host is in `--allowed_media_domains` (given, only those hosts are
fetched at all, whatever they resolve to: the operator named them). The request then goes to the checked address
itself, the URL's host kept as Host header and TLS server name (`pinned_request`), so DNS cannot answer one thing to
the check and another to the connection (DNS rebinding). images.py checks every redirect hop the same way.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

HINT = "allow it with --allowed_media_networks, or the host with --allowed_media_domains"
_PRIVATE = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT: a provider's internal network
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # a NAT64 gateway connects to the IPv4 address in the low bits
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated ::a.b.c.d
# forms whose connection goes to the IPv4 address itself (no gateway between): judged by that address alone
_CARRIERS = (ipaddress.ip_network("::ffff:0:0/96"), _IPV4_COMPATIBLE)


class Refused(ValueError):
    """A URL the server will not fetch: the message says why and which flag would allow it."""


def split_list(values: Iterable[str] | str | None) -> list[str]:
    """A list flag's entries, given as several values, comma-separated, or both."""
    if isinstance(values, str):
        values = [values]
    return [item.strip() for value in values or () for item in value.split(",") if item.strip()]


def parse_networks(specs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """`--allowed_media_networks` entries (CIDR networks or single addresses); ValueError names a bad one."""
    networks = []
    for spec in split_list(specs):
        try:
            networks.append(ipaddress.ip_network(spec))
        except ValueError as exc:
            raise ValueError(f"allowed_media_networks: {spec!r} is not an address or CIDR network such as "
                             f"10.0.0.0/8 ({exc})") from None
    return tuple(networks)


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 form carries (mapped ::ffff:a.b.c.d, 6to4, NAT64, IPv4-compatible), else None."""
    if ip.version == 4:
        return None
    if ip.ipv4_mapped or ip.sixtofour:
        return ip.ipv4_mapped or ip.sixtofour
    if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):  # :: and ::1 are IPv6's own
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _address_class(ip: IPAddress) -> str | None:
    """What kind of non-public address `ip` is, or None for a public one."""
    checks = (("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback),
              ("link-local", ip.is_link_local),  # 169.254.169.254 is where clouds serve instance credentials
              ("multicast", ip.is_multicast), ("private", any(ip in net for net in _PRIVATE)),
              ("shared (carrier-grade NAT)", ip in _SHARED), ("reserved", ip.is_reserved),
              ("site-local", getattr(ip, "is_site_local", False)),
              ("special-purpose", not ip.is_global))  # documentation, benchmarking, ... ranges
    kind = next((name for name, hit in checks if hit), None)
    return kind and f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} address"


def address_refused(ip: IPAddress | str, allowed_networks: Sequence[IPNetwork] = ()) -> str | None:
    """Why the server may not connect to `ip` (e.g. "a loopback address"), or None: a public address or one in
    `allowed_networks`. An IPv6 form that carries an IPv4 address is judged by that address (too, when a gateway
    stands between: 6to4, NAT64)."""
    ip = ipaddress.ip_address(ip)
    inner = embedded_ipv4(ip)
    forms = (ip,) if inner is None else (inner,) if any(ip in net for net in _CARRIERS) else (inner, ip)
    if any(form in net for form in (ip, inner) if form is not None for net in allowed_networks):
        return None
    for form in forms:
        kind = _address_class(form)
        if kind:
            return kind if form is ip else f"an IPv6 form of {inner}, {kind}"
    return None


def resolve_host(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to, in the resolver's order; OSError when it resolves to none."""
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in found))
    if not addresses:
        raise OSError(f"{host} resolves to no address")
    return addresses


def checked_addresses(host: str, port: int, allowed_domains: Sequence[str] = (),
                      allowed_networks: Sequence[IPNetwork] = (),
                      resolve: Callable[[str, int], list[IPAddress]] | None = None) -> list[IPAddress]:
    """The addresses the server may connect to for `host`, resolved once (`resolve`, default `resolve_host`);
    Refused when the host is not listed or any of its addresses is refused, OSError when it does not resolve."""
    name = host.rstrip(".").lower()
    listed = name in {domain.rstrip(".").lower() for domain in allowed_domains}
    if allowed_domains and not listed:
        raise Refused(f"host {host} is not in --allowed_media_domains")
    try:
        addresses, literal = [ipaddress.ip_address(name)], True
    except ValueError:
        addresses, literal = (resolve or resolve_host)(name, port), False
    if listed:
        return addresses
    for ip in addresses:  # every address: a client could otherwise hide an internal one behind a public one
        reason = address_refused(ip, allowed_networks)
        if reason:
            said = f"{host} is {reason}" if literal else f"{host} resolves to {ip}, {reason}"
            raise Refused(f"{said}; {HINT}")
    return addresses


def pinned_request(client, url, ip: IPAddress, timeout: float):
    """An httpx GET of `url` sent to `ip` itself: the URL's host stays the Host header and, for https, the TLS
    server name the certificate is checked against (httpx's `sni_hostname` request extension)."""
    extensions = {"sni_hostname": url.raw_host.decode("ascii")} if url.scheme == "https" else {}
    return client.build_request("GET", url.copy_with(host=str(ip)), headers={"Host": url.netloc.decode("ascii")},
                                timeout=timeout, extensions=extensions)
