"""
Certificates made in the tests: a root CA, an intermediate CA, and server
certificates for 127.0.0.1 and localhost, written as PEM files.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass

from twisted.trial.unittest import SkipTest

try:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    import OpenSSL  # noqa: F401  (what Twisted's TLS needs)
except ImportError:  # pragma: no cover - the test extra installs them
    x509 = None


def requireTLS() -> None:
    if x509 is None:
        raise SkipTest("pyOpenSSL and cryptography are not installed (pip install '.[tls]')")


@dataclass
class Issued:
    key: object
    cert: object

    def certPEM(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def keyPEM(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _builder(subject: str, issuer: Issued | None, key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.cert.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), False
        )
    return builder


def makeCA(subject: str, issuer: Issued | None = None) -> Issued:
    """
    A CA certificate, self-signed or issued by C{issuer}.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _builder(subject, issuer, key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            True,
        )
    )
    signer = issuer.key if issuer else key
    return Issued(key, builder.sign(signer, hashes.SHA256()))


def makeServer(issuer: Issued) -> Issued:
    """
    A server certificate for 127.0.0.1, ::1 and localhost.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _builder("nydus-proxy test server", issuer, key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(
            x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1")),
            ]),
            False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
    )
    return Issued(key, builder.sign(issuer.key, hashes.SHA256()))


def writePEM(directory: str, name: str, data: bytes) -> str:
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(data)
    return path
