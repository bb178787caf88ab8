"""Which addresses `bimode serve` may fetch remote images from (serve/url_guard.py): public ones, and internal ones
only inside the operator's --allowed_media_networks; hosts resolved once, every address checked."""

import ipaddress

import httpx
import pytest

from bimode.serve.url_guard import (Refused, address_refused, checked_addresses, parse_networks, pinned_request,
                                    split_list)


@pytest.mark.parametrize("ip, kind", [
    ("10.0.0.1", "a private address"), ("10.255.255.255", "a private address"),
    ("172.16.0.1", "a private address"), ("172.31.255.254", "a private address"),
    ("192.168.1.1", "a private address"),
    ("169.254.169.254", "a link-local address"),  # cloud instance metadata
    ("100.64.0.1", "a shared (carrier-grade NAT) address"), ("100.127.255.254", "a shared (carrier-grade NAT) address"),
    ("224.0.0.1", "a multicast address"), ("239.255.255.250", "a multicast address"),
    ("0.0.0.0", "an unspecified address"), ("127.0.0.1", "a loopback address"), ("127.8.9.10", "a loopback address"),
    ("240.0.0.1", "a reserved address"), ("192.0.2.7", "a special-purpose address"),  # documentation range
    ("::1", "a loopback address"), ("::", "an unspecified address"),
    ("fe80::1", "a link-local address"), ("febf::1", "a link-local address"),
    ("fc00::1", "a private address"), ("fd12:3456::1", "a private address"),
    ("ff02::1", "a multicast address"),
    # IPv6 forms that carry an IPv4 address are judged by it
    ("::ffff:10.0.0.1", "an IPv6 form of 10.0.0.1, a private address"),
    ("::ffff:127.0.0.1", "an IPv6 form of 127.0.0.1, a loopback address"),
    ("::ffff:169.254.169.254", "an IPv6 form of 169.254.169.254, a link-local address"),
    ("64:ff9b::a9fe:a9fe", "an IPv6 form of 169.254.169.254, a link-local address"),  # NAT64
    ("2002:7f00:1::", "an IPv6 form of 127.0.0.1, a loopback address"),  # 6to4
    ("::127.0.0.1", "an IPv6 form of 127.0.0.1, a loopback address"),  # IPv4-compatible
])
def test_internal_addresses_are_refused_with_their_kind(ip, kind):
    assert address_refused(ip) == kind


@pytest.mark.parametrize("ip", ["8.8.8.8", "93.184.216.34", "172.32.0.1", "100.128.0.1", "2606:4700:4700::1111",
                                "::ffff:8.8.8.8"])
def test_public_addresses_are_allowed(ip):
    assert address_refused(ip) is None


def test_the_allowed_networks_let_their_addresses_through_and_no_others():
    allowed = parse_networks(["127.0.0.0/8,10.0.0.0/8", "fd00::/8"])
    for ip in ("127.0.0.1", "10.9.8.7", "::ffff:10.0.0.1", "fd00::5"):
        assert address_refused(ip, allowed) is None, ip
    assert address_refused("192.168.0.1", allowed) == "a private address"
    assert address_refused("::1", allowed) == "a loopback address"  # 127.0.0.0/8 is not IPv6's loopback
    assert address_refused("169.254.169.254", parse_networks(["169.254.169.254"])) is None  # one address


def test_a_bad_network_is_named():
    with pytest.raises(ValueError, match=r"allowed_media_networks: '10.0.0.1/8' is not an address or CIDR network"):
        parse_networks(["127.0.0.0/8", "10.0.0.1/8"])
    with pytest.raises(ValueError, match="'intranet' is not an address"):
        parse_networks(["intranet"])
    assert split_list(["a.com,b.com", " c.com ", ""]) == ["a.com", "b.com", "c.com"]


def _answers(*ips):
    calls = []

    def resolve(host, port):
        calls.append((host, port))
        return [ipaddress.ip_address(ip) for ip in ips]
    return resolve, calls


def test_every_address_a_host_resolves_to_is_checked():
    resolve, calls = _answers("93.184.216.34", "10.0.0.7")
    with pytest.raises(Refused, match=r"^images\.example resolves to 10\.0\.0\.7, a private address; allow it "
                                      r"with --allowed_media_networks, or the host with --allowed_media_domains$"):
        checked_addresses("images.example", 80, resolve=resolve)
    assert calls == [("images.example", 80)]
    resolve, _ = _answers("93.184.216.34", "2606:4700::1")
    assert [str(ip) for ip in checked_addresses("images.example", 443, resolve=resolve)] == ["93.184.216.34",
                                                                                             "2606:4700::1"]


def test_listed_domains_are_the_only_hosts_and_are_fetched_whatever_they_resolve_to():
    resolve, calls = _answers("127.0.0.1")
    assert [str(ip) for ip in checked_addresses("Images.Internal.", 80, ["images.internal"], resolve=resolve)] == [
        "127.0.0.1"]
    with pytest.raises(Refused, match="host elsewhere.example is not in --allowed_media_domains"):
        checked_addresses("elsewhere.example", 80, ["images.internal"], resolve=resolve)
    assert len(calls) == 1  # a host not listed is refused before it is resolved


def test_an_address_literal_is_checked_without_resolving():
    resolve, calls = _answers("8.8.8.8")
    with pytest.raises(Refused, match="^::1 is a loopback address"):
        checked_addresses("::1", 80, resolve=resolve)
    assert [str(ip) for ip in checked_addresses("8.8.4.4", 80, resolve=resolve)] == ["8.8.4.4"] and calls == []


def test_the_pinned_request_goes_to_the_address_under_the_urls_host_name():
    """The connection's address is the checked one; the Host header and the TLS server name (which the
    certificate is verified against) stay the URL's host."""
    with httpx.Client() as client:
        request = pinned_request(client, httpx.URL("https://images.example:8443/a.png?x=1"),
                                 ipaddress.ip_address("93.184.216.34"), 5.0)
        assert str(request.url) == "https://93.184.216.34:8443/a.png?x=1"
        assert request.headers["host"] == "images.example:8443"
        assert request.extensions["sni_hostname"] == "images.example"
        request = pinned_request(client, httpx.URL("http://images.example/a.png"),
                                 ipaddress.ip_address("2606:4700::1"), 5.0)
        assert str(request.url) == "http://[2606:4700::1]/a.png" and request.headers["host"] == "images.example"
        assert "sni_hostname" not in request.extensions


def test_serve_takes_the_lists_with_commas_or_spaces_and_refuses_bad_ones():
    from bimode.commands.serve import ServeConfig
    from bimode.errors import UsageError

    cfg = ServeConfig(model="m", allow_remote_images=True, allowed_media_domains=["a.example,b.example", "c.example"],
                      allowed_media_networks=["127.0.0.0/8,10.0.0.0/8"])
    assert cfg.allowed_media_domains == ["a.example", "b.example", "c.example"]
    assert cfg.allowed_media_networks == ["127.0.0.0/8", "10.0.0.0/8"]
    with pytest.raises(UsageError, match="'intranet' is not an address or CIDR network"):
        ServeConfig(model="m", allow_remote_images=True, allowed_media_networks=["intranet"])
    with pytest.raises(UsageError, match="give --allow_remote_images too"):
        ServeConfig(model="m", allowed_media_domains=["a.example"])
