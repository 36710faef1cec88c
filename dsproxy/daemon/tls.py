"""TLS for the proxy's TCP listeners (``dsproxy proxy --listen HOST:PORT``): certificate, key, context.

TCP is always TLS; the Unix socket never is.  The certificate and key are ``--tls-cert`` /
``--tls-key`` when given, else ``proxy.pem`` / ``proxy.key`` in the config dir -- PBS's names and
place -- generated on the first start that listens on TCP.

**The generated certificate** (:func:`generate`), compared with what PBS does in
``update_self_signed_cert`` (proxmox-backup ``src/config/mod.rs``):

* PBS: RSA 4096, valid ``365 * 1000`` days, a subject made unique with a UUID (browsers trip over
  two self-signed certificates with one subject and serial), SANs of the node name, its FQDN and
  ``localhost``.
* here: **ECDSA P-256**: every new connection's handshake signs with the key, and on the project
  machine a P-256 signature costs 23 us of the worker's CPU where RSA 4096 costs 1.5 ms (measured
  with ``cryptography``, 500 and 50 signatures); generating the key takes well under 1 ms instead
  of RSA 4096's ~0.35 s.  The same
  ``365 * 1000`` days (a self-signed certificate is trusted by pinning, not by expiry; renewing it
  would break every pinned client), a unique subject (``O=dsproxy``, ``OU=<uuid>``, ``CN=<hostname>``)
  and SANs ``<hostname>``, ``localhost``, ``127.0.0.1``, ``::1``.  ``basicConstraints CA:FALSE``,
  ``keyUsage digitalSignature``, ``extendedKeyUsage serverAuth``, subject and authority key ids: a
  server certificate that OpenSSL's strict mode (Python 3.13's default) and browsers accept when it
  is trusted directly (``curl --cacert proxy.pem``).

The key is written ``0640`` and the certificate ``0644`` through :func:`dsproxy.fsutil.replace_in`
(a temp file created ``O_EXCL|O_NOFOLLOW`` with its final mode, renamed into place: a link planted
at the name is replaced, never written through, and the key is never readable by others, not even
for a moment).

**The server context** (:func:`server_context`): ``ssl.create_default_context(Purpose.CLIENT_AUTH)``
(OpenSSL's default cipher list minus the weak ones, no compression, session tickets), TLS 1.2 at
least, no client certificates, ALPN ``http/1.1``.  The master builds it before forking, so every
worker serves the same certificate; a reload (``SIGHUP``) builds it again from the files, and a
certificate that no longer loads keeps the old context (logged) rather than failing the reload.

``dsproxy cert info`` (:func:`certificate_info`) prints the subject, validity, SANs and the SHA-256
fingerprint in the ``AA:BB:...`` form clients pin (``curl --pinnedpubkey`` takes the key's hash
instead: ``sha256//<base64>``, printed as well).

``cryptography`` (the PyCA package) is imported only to generate or describe a certificate: the
daemons' start-up does not pay for it when the files exist.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import socket
import ssl
import uuid
from pathlib import Path
from typing import Any, NamedTuple

from .. import fsutil

CERT_NAME = "proxy.pem"
KEY_NAME = "proxy.key"
KEY_MODE = 0o640
CERT_MODE = 0o644
VALID_DAYS = 365 * 1000  # as PBS's self-signed certificate
ALPN = ("http/1.1",)


class TLSError(Exception):
    """The certificate or key cannot be made or loaded; the message names the file and the reason."""


class CertFiles(NamedTuple):
    cert: Path
    key: Path


def default_files(config_dir: Path) -> CertFiles:
    return CertFiles(config_dir / CERT_NAME, config_dir / KEY_NAME)


# -- generation ---------------------------------------------------------------------------------------


def generate(hostname: str | None = None) -> tuple[bytes, bytes]:
    """A new self-signed certificate and its key, both PEM: ``(cert_pem, key_pem)`` (see the module)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    signing_only = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
    )  # fmt: skip
    host = hostname or socket.gethostname() or "localhost"
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dsproxy"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, str(uuid.uuid4())),
            x509.NameAttribute(NameOID.COMMON_NAME, host[:64]),
        ]
    )
    dns = list(dict.fromkeys([host, "localhost"]))
    san = [x509.DNSName(d) for d in dns] + [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # a client whose clock is a little behind
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(signing_only, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def ensure_self_signed(config_dir: Path) -> tuple[CertFiles, bool]:
    """``proxy.pem`` + ``proxy.key`` in ``config_dir``, generated if either is missing (as PBS does);
    returns the files and whether they were generated now."""
    files = default_files(config_dir)
    if files.cert.exists() and files.key.exists():
        return files, False
    cert_pem, key_pem = generate()
    try:
        dir_fd = fsutil.open_dir(config_dir)
    except OSError as err:
        raise TLSError(f"cannot open {config_dir} to write a certificate: {err}") from None
    try:
        fsutil.replace_in(dir_fd, KEY_NAME, key_pem, KEY_MODE)  # the key first: a cert without it is useless
        fsutil.replace_in(dir_fd, CERT_NAME, cert_pem, CERT_MODE)
    except OSError as err:
        raise TLSError(f"cannot write the certificate into {config_dir}: {err}") from None
    finally:
        os.close(dir_fd)
    return files, True


# -- the server's context -----------------------------------------------------------------------------


def server_context(files: CertFiles) -> ssl.SSLContext:
    """The context the workers serve TLS with (see the module); :class:`TLSError` if the files do not load."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_NONE  # no client certificates: clients authenticate with API tokens
    ctx.set_alpn_protocols(list(ALPN))
    try:
        ctx.load_cert_chain(str(files.cert), str(files.key))
    except FileNotFoundError as err:
        raise TLSError(f"certificate or key missing: {err.filename}") from None
    except PermissionError as err:
        raise TLSError(f"cannot read {err.filename}: permission denied") from None
    except (ssl.SSLError, OSError) as err:
        raise TLSError(f"cannot load the certificate {files.cert} with the key {files.key}: {_reason(err)}") from None
    return ctx


def _reason(err: Exception) -> str:
    if isinstance(err, ssl.SSLError) and err.reason:
        return str(err.reason).replace("_", " ").lower()
    return str(err)


# -- describing a certificate -------------------------------------------------------------------------


def fingerprint(der: bytes) -> str:
    """The SHA-256 fingerprint of a DER certificate as clients pin it: ``AA:BB:...`` (32 pairs)."""
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def file_fingerprint(path: Path) -> str:
    """:func:`fingerprint` of the first certificate in a PEM file (the server's, in a chain); no
    ``cryptography`` import (the master logs it at every start and reload)."""
    text = path.read_text("ascii", "replace")
    begin = text.find("-----BEGIN CERTIFICATE-----")
    end = text.find("-----END CERTIFICATE-----", begin)
    if begin < 0 or end < 0:
        raise TLSError(f"{path} holds no PEM certificate")
    return fingerprint(ssl.PEM_cert_to_DER_cert(text[begin : end + len("-----END CERTIFICATE-----")]))


def certificate_info(path: Path) -> dict[str, Any]:
    """What ``dsproxy cert info`` prints about the PEM certificate at ``path``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as err:
        raise TLSError(f"cannot read {path}: {err.strerror or err}") from None
    except ValueError as err:
        raise TLSError(f"{path} is not a PEM certificate: {err}") from None
    try:
        sans: list[str] = [
            str(n.value) for n in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        ]
    except x509.ExtensionNotFound:
        sans = []
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return {
        "file": str(path),
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "self-signed": cert.subject == cert.issuer,
        "not-before": cert.not_valid_before_utc.isoformat(),
        "not-after": cert.not_valid_after_utc.isoformat(),
        "san": sans,
        "public-key": _key_kind(cert.public_key()),
        "fingerprint": fingerprint(cert.public_bytes(serialization.Encoding.DER)),
        "pinned-pubkey": "sha256//" + base64.b64encode(hashlib.sha256(spki).digest()).decode(),
    }


def _key_kind(key: Any) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA {key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    return type(key).__name__


__all__ = [
    "CertFiles",
    "TLSError",
    "certificate_info",
    "default_files",
    "ensure_self_signed",
    "file_fingerprint",
    "fingerprint",
    "generate",
    "server_context",
]
