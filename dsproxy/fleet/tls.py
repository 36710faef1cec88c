"""TLS to etcd: the files ``--etcd-cacert``, ``--etcd-cert`` and ``--etcd-key`` name, read and checked.

etcd serves its clients over TLS when started with ``--cert-file``/``--key-file`` (``https://``
client URLs), and with ``--client-cert-auth`` it accepts only clients whose certificate its
``--trusted-ca-file`` signed -- the usual way to keep other machines on the network from rewriting
a fleet's configuration.  dsproxy speaks to such a cluster as etcdctl does:

* ``--etcd-cacert FILE``: the CA certificates (PEM, one or more) that verify the members'
  certificates; without it, the system's trust store (gRPC's default roots).  A member's
  certificate must name the host of its endpoint (an IP address as an IP SAN).
* ``--etcd-cert FILE`` / ``--etcd-key FILE``: this client's certificate (chain) and its private key
  (PEM, unencrypted), both or neither.

Any of them, or an ``https://`` endpoint, turns TLS on for every endpoint; ``http://`` endpoints
with them, or ``http://`` and ``https://`` mixed, are refused -- a fleet that is half plain text is
a mistake.  The files are read once, at start, and checked here so that a wrong file is an error
naming it and what is wrong (not a PEM certificate, a key that does not belong to the certificate,
a certificate that has expired), not a TLS handshake that fails on every call.  Nothing read here
is ever logged: :class:`EtcdTLS`'s ``repr`` shows the certificates' subjects, never the key.  The
key file should be readable by the manager's user only (as ``/etc/etcd``'s own are).

This module does not import gRPC (the CLI checks the options with it before any connection).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography import x509

# (cryptography is imported where a file is loaded: ~30 ms of every fleet manager's start, most
# of which use no TLS to etcd)

#: the largest file taken as a certificate bundle or key (a CA bundle of a distribution is ~200 KB)
MAX_PEM_BYTES = 1 << 20


class TLSFileError(ValueError):
    """A TLS file that cannot be used; the message names the option, the file and why."""


@dataclass(frozen=True)
class EtcdTLS:
    """What TLS to etcd uses (PEM bytes): ``ca`` None means the system's trust store."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = field(default=None, repr=False)  # never in a log line
    subjects: tuple[str, ...] = ()  # of the CA certificates and the client certificate, for messages

    def __repr__(self) -> str:
        key = "<key>" if self.key is not None else None
        return f"EtcdTLS(ca={'<system roots>' if self.ca is None else 'given'}, subjects={self.subjects}, key={key})"


def _read(option: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PEM_BYTES + 1)
    except OSError as err:
        raise TLSFileError(f"{option} {path}: cannot read it: {err.strerror or err}") from None
    if len(data) > MAX_PEM_BYTES:
        raise TLSFileError(f"{option} {path}: larger than {MAX_PEM_BYTES} bytes: not a PEM file")
    return data


def _certificates(option: str, path: str, data: bytes) -> list[x509.Certificate]:
    from cryptography import x509

    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as err:
        raise TLSFileError(f"{option} {path}: not a PEM certificate: {err}") from None
    now = datetime.datetime.now(datetime.UTC)
    for cert in certs:
        if cert.not_valid_after_utc < now:
            raise TLSFileError(
                f"{option} {path}: the certificate of {cert.subject.rfc4514_string()} expired on "
                f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
            )
    return certs


def load(cacert: str | None = None, cert: str | None = None, key: str | None = None) -> EtcdTLS:
    """The files read and checked (see the module); :class:`TLSFileError` naming what is wrong."""
    if (cert is None) != (key is None):
        given, missing = ("--etcd-cert", "--etcd-key") if cert is not None else ("--etcd-key", "--etcd-cert")
        raise TLSFileError(f"{given} needs {missing}: a client certificate and its key go together")
    from cryptography.hazmat.primitives import serialization

    subjects: list[str] = []
    ca = None
    if cacert is not None:
        ca = _read("--etcd-cacert", cacert)
        subjects += [c.subject.rfc4514_string() for c in _certificates("--etcd-cacert", cacert, ca)]
    chain = private = None
    if cert is not None and key is not None:
        chain = _read("--etcd-cert", cert)
        leaf = _certificates("--etcd-cert", cert, chain)[0]
        subjects.append(leaf.subject.rfc4514_string())
        private = _read("--etcd-key", key)
        try:
            loaded = serialization.load_pem_private_key(private, password=None)
        except (ValueError, TypeError) as err:
            reason = "encrypted (give an unencrypted key)" if isinstance(err, TypeError) else "not a PEM private key"
            raise TLSFileError(f"--etcd-key {key}: {reason}") from None
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        mine = loaded.public_key().public_bytes(serialization.Encoding.DER, spki)
        if mine != leaf.public_key().public_bytes(serialization.Encoding.DER, spki):
            raise TLSFileError(f"--etcd-key {key}: not the key of the certificate in {cert}")
    return EtcdTLS(ca, chain, private, tuple(subjects))


def wanted(endpoints: Sequence[str], files: bool) -> bool:
    """Whether TLS is on for ``endpoints``, ``files`` telling whether any TLS file is given;
    ValueError for a mix (see the module)."""
    secure = {e.strip().startswith("https://") for e in endpoints}
    plain = {e.strip().startswith("http://") for e in endpoints}
    if True in secure and True in plain:
        raise ValueError("etcd endpoints mix http:// and https://: give all of them one way")
    if files and True in plain:
        raise ValueError("--etcd-cacert/--etcd-cert/--etcd-key with http:// endpoints: give https:// (or host:port)")
    return files or True in secure


__all__ = ["MAX_PEM_BYTES", "EtcdTLS", "TLSFileError", "load", "wanted"]
