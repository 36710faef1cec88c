"""A throwaway certificate authority for the TLS tests of fleet mode (etcd over TLS).

:func:`make` writes, under a directory, a CA (``ca.pem``), a server certificate for the loopback
members (``server.pem``/``server.key``: SAN IP 127.0.0.1 and DNS localhost) and a client
certificate (``client.pem``/``client.key``), all signed by the CA, EC P-256, valid for a day; and
a second, unrelated CA (``other-ca.pem``) with a client certificate of its own
(``other-client.pem``/``other-client.key``), for the refusals.  Keys are written mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class PKI:
    """The files :func:`make` wrote."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path
    other_client_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, data: bytes, mode: int) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    pkcs8 = serialization.PrivateFormat.PKCS8
    return key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption())


_CA_USAGE = x509.KeyUsage(
    digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, encipher_only=False, decipher_only=False,
)  # fmt: skip


def _ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(
    ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, cn: str, server: bool
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    usage = (
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        if server
        else [ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    )
    if server:
        names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def make(directory: Path) -> PKI:
    """Write the CA, the server and client certificates under ``directory`` (see the module)."""
    directory.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    ca_key, ca = _ca("dsproxy test CA")
    server_key, server = _leaf(ca_key, ca, "etcd member", server=True)
    client_key, client = _leaf(ca_key, ca, "dsproxy-manager", server=False)
    other_key, other = _ca("some other CA")
    stranger_key, stranger = _leaf(other_key, other, "stranger", server=False)
    return PKI(
        ca=_write(directory / "ca.pem", ca.public_bytes(pem), 0o644),
        server_cert=_write(directory / "server.pem", server.public_bytes(pem), 0o644),
        server_key=_write(directory / "server.key", _key_pem(server_key), 0o600),
        client_cert=_write(directory / "client.pem", client.public_bytes(pem), 0o644),
        client_key=_write(directory / "client.key", _key_pem(client_key), 0o600),
        other_ca=_write(directory / "other-ca.pem", other.public_bytes(pem), 0o644),
        other_client_cert=_write(directory / "other-client.pem", stranger.public_bytes(pem), 0o644),
        other_client_key=_write(directory / "other-client.key", _key_pem(stranger_key), 0o600),
    )


__all__ = ["PKI", "make"]
