"""`hierfed certs`: development TLS certificates for the coordinator and one SuperNode
authentication key pair per site, in the formats Flower 1.42 reads.

- ``ca.crt`` / ``ca.key``: a self-signed CA; sites trust ``ca.crt`` (``--root-cert``).
- ``server.crt`` / ``server.key``: the SuperLink's certificate, signed by the CA, valid for the
  given host names and IP addresses (subject alternative names).
- ``sites/NAME.key`` / ``sites/NAME.pub``: the site's EC (NIST P-384) key pair as OpenSSH files:
  ``flower-supernode --auth-supernode-private-key`` loads the private key with
  ``load_ssh_private_key`` and ``flwr supernode register`` loads the public one with
  ``load_ssh_public_key``; both insist on a NIST curve.

Existing keys are kept (a site's registered key and the CA that sites already trust stay valid), so
running the command again with another ``--site`` or ``--host`` only adds what is missing; the
server certificate is issued anew each time, for the hosts given.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from hiermodel.errors import ConfigError

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
SITES_DIR = "sites"
# The coordinator's own processes reach the SuperLink on the loopback: the SuperExec that starts
# the ServerApp (it connects to the bind address with 0.0.0.0 replaced by 127.0.0.1) and `flwr`
# run on that machine. Without these names in the certificate their TLS handshake fails.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1")
CA_DAYS, SERVER_DAYS = 3650, 825  # 825 days: the longest server certificate lifetime macOS/browsers accept
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DNS_NAME = re.compile(r"^(?=.{1,253}$)(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


@dataclass(frozen=True)
class SiteKeys:
    name: str
    private_key: Path
    public_key: Path
    created: bool


@dataclass(frozen=True)
class CertificateSet:
    folder: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    hosts: tuple[str, ...]
    sites: tuple[SiteKeys, ...]
    ca_created: bool


def site_key_paths(folder: Path, site: str) -> tuple[Path, Path]:
    """Where `hierfed certs` keeps a site's private and public key."""
    return folder / SITES_DIR / f"{site}.key", folder / SITES_DIR / f"{site}.pub"


def check_site_name(site: str) -> str:
    """A site name is a file name and a node config value: letters, digits, '.', '_', '-'."""
    if not SITE_NAME.match(site):
        raise ConfigError(f"site name {site!r} is not allowed; use 1-64 letters, digits, '.', '_' or '-' (not first)")
    return site


def _san_entries(hosts: list[str]):
    from cryptography import x509

    entries, seen = [], set()
    for host in [*hosts, *LOOPBACK_HOSTS]:
        key = host.lower()
        if key in seen:
            continue
        seen.add(key)
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not DNS_NAME.match(host):
                raise ConfigError(f"--host {host!r} is neither an IP address nor a DNS name; pass e.g. coordinator.example.org or 10.0.0.5") from None
            entries.append(x509.DNSName(host))
    return entries


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only (created so: never briefly world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hierfed development"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _load_or_create_ca(folder: Path):
    """The CA key and certificate in folder, made (self-signed) when absent."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    cert_path, key_path = folder / CA_CERT, folder / CA_KEY
    if cert_path.exists() != key_path.exists():
        present, missing = (cert_path, key_path) if cert_path.exists() else (key_path, cert_path)
        raise ConfigError(f"{present} exists but {missing} does not; restore it, or move {present} away to make a new CA")
    if cert_path.exists():
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{folder}: cannot read the existing CA ({exc}); pass another --out or remove ca.crt and ca.key") from None
        return key, cert, False
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("hierfed development CA"))
        .issuer_name(_name("hierfed development CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate small clock skew between machines
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(key_path, _pem_key(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, True


def _issue_server_certificate(folder: Path, *, hosts: list[str], ca_key, ca_cert) -> None:
    """server.crt / server.key for hosts (and the loopback), signed by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(_san_entries(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(folder / SERVER_KEY, _pem_key(key))
    (folder / SERVER_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _site_keys(folder: Path, site: str) -> SiteKeys:
    """The site's key pair, made when absent (an existing key may already be registered: kept)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private_path, public_path = site_key_paths(folder, site)
    if private_path.exists():
        try:
            key = serialization.load_ssh_private_key(private_path.read_bytes(), password=None)
        except ValueError as exc:
            raise ConfigError(f"{private_path}: not an OpenSSH private key ({exc}); remove it to make a new one") from None
        created = False
    else:
        key = ec.generate_private_key(ec.SECP384R1())
        _write_private(private_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                       serialization.NoEncryption()))
        created = True
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public_path.write_bytes(public + f" {site}\n".encode())  # the comment names the site in `flwr supernode ls`-style listings
    return SiteKeys(site, private_path, public_path, created)


def make_certificates(folder: Path, *, hosts: list[str], sites: list[str]) -> CertificateSet:
    """The CA (kept if present), a server certificate for hosts, and a key pair per site."""
    if not hosts:
        raise ConfigError("give at least one --host: the name or IP address the sites use to reach the coordinator")
    for site in sites:
        check_site_name(site)
    _san_entries(hosts)  # check every host before anything is written
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert, ca_created = _load_or_create_ca(folder)
    _issue_server_certificate(folder, hosts=hosts, ca_key=ca_key, ca_cert=ca_cert)
    keys = tuple(_site_keys(folder, site) for site in dict.fromkeys(sites))
    return CertificateSet(folder=folder, ca_cert=folder / CA_CERT, server_cert=folder / SERVER_CERT,
                          server_key=folder / SERVER_KEY, hosts=tuple(dict.fromkeys([*hosts, *LOOPBACK_HOSTS])),
                          sites=keys, ca_created=ca_created)


def add_certs_arguments(parser: argparse.ArgumentParser) -> None:
    """`hierfed certs --out DIR --host NAME [--host NAME ...] [--site NAME ...]`."""
    parser.add_argument("--out", required=True, type=Path, help="folder for ca.crt/.key, server.crt/.key and sites/NAME.key/.pub")
    parser.add_argument("--host", action="append", default=[], required=True, metavar="NAME",
                        help="a DNS name or IP address sites use to reach the coordinator (repeat; localhost and 127.0.0.1 are always added)")
    parser.add_argument("--site", action="append", default=[], metavar="NAME",
                        help="a site to make a SuperNode authentication key pair for (repeat)")


def run_certs(args: argparse.Namespace) -> int:
    """Write the certificates and keys, and say what goes where."""
    made = make_certificates(args.out, hosts=args.host, sites=args.site)
    print(f"{'wrote' if made.ca_created else 'kept'} CA {made.ca_cert} (+ {CA_KEY}: keep it off the servers)")
    print(f"wrote server certificate {made.server_cert} for {', '.join(made.hosts)} (+ {SERVER_KEY})")
    for site in made.sites:
        print(f"{'wrote' if site.created else 'kept'} site {site.name}: {site.private_key} (copy to the site only), {site.public_key}")
    print("these are development certificates; see the README (Deployment) to bring your own")
    return 0
