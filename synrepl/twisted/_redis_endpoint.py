"""Where and how to connect: TCP, TLS (options built from the config's files), unix."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, cast

from twisted.internet import ssl
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

from synrepl.config import RedisConfig
from synrepl.connection import TransportOptions
from synrepl.errors import ConfigError

__all__ = ("make_endpoint", "tls_options")

logger = logging.getLogger("synrepl.redis")


def make_endpoint(reactor: Any, redis: RedisConfig, options: TransportOptions) -> Any:
    """An IStreamClientEndpoint for ``redis`` (typed Any: zope interfaces do not
    type-check).  TLS files are read here, once, so a bad one fails at once.

    Raises:
        ConfigError: a TLS file cannot be read or holds no certificate/key.
    """
    timeout = options.connect_timeout
    if redis.path:
        if redis.use_tls:
            logger.warning(
                "Redis: use_tls is ignored with a unix socket path (%s), as in Synapse",
                redis.path,
            )
        return UNIXClientEndpoint(  # type: ignore[no-untyped-call]
            reactor, redis.path, timeout=timeout
        )
    tcp = HostnameEndpoint(reactor, redis.host, redis.port, timeout=timeout)
    if not redis.use_tls:
        return tcp
    return wrapClientTLS(tls_options(redis, options.tls_verify), cast(Any, tcp), clock=reactor)


# --- TLS ---------------------------------------------------------------------

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


def _read_pem(file: str, key: str) -> bytes:
    try:
        return Path(file).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read '{file}': {e.strerror or e}", ("redis", key)) from None


def _certificates(data: bytes, file: str, key: str) -> list[tuple[bytes, ssl.Certificate]]:
    """Each PEM certificate in ``data``, as (PEM block, parsed)."""
    found = []
    for block in _PEM_CERTIFICATE.findall(data):
        try:
            found.append((block, ssl.Certificate.loadPEM(block)))
        except Exception as e:  # noqa: BLE001 - OpenSSL has many ways to refuse
            raise ConfigError(
                f"'{file}' holds a certificate that cannot be read: {e}", ("redis", key)
            ) from None
    return found


def _ca_certificates(redis: RedisConfig) -> list[ssl.Certificate]:
    """Every CA certificate in ``ca_file`` and in the files of ``ca_path``."""
    found: list[tuple[bytes, ssl.Certificate]] = []
    if redis.ca_file:
        found += _certificates(_read_pem(redis.ca_file, "ca_file"), redis.ca_file, "ca_file")
        if not found:
            raise ConfigError(f"no PEM certificate in '{redis.ca_file}'", ("redis", "ca_file"))
    if redis.ca_path:
        directory = Path(redis.ca_path)
        if not directory.is_dir():
            raise ConfigError(f"'{redis.ca_path}' is not a directory", ("redis", "ca_path"))
        in_dir: list[tuple[bytes, ssl.Certificate]] = []
        for file in sorted(p for p in directory.iterdir() if p.is_file()):
            try:  # an OpenSSL CA directory may also hold CRLs and other files
                in_dir += _certificates(file.read_bytes(), str(file), "ca_path")
            except (OSError, ConfigError):
                continue
        if not in_dir:
            raise ConfigError(
                f"no readable PEM certificate in '{redis.ca_path}'", ("redis", "ca_path")
            )
        found += in_dir
    return [cert for _, cert in found]


def tls_options(redis: RedisConfig, verify: bool) -> IOpenSSLClientConnectionCreator:
    """TLS client options from the ``redis`` section; files are read once, here."""
    client: ssl.PrivateCertificate | None = None
    chain: list[Any] = []
    if redis.private_key_file and not redis.certificate_file:
        raise ConfigError("private_key_file needs certificate_file", ("redis", "private_key_file"))
    if redis.certificate_file:
        cert_pem = _read_pem(redis.certificate_file, "certificate_file")
        certs = _certificates(cert_pem, redis.certificate_file, "certificate_file")
        if not certs:
            raise ConfigError(
                f"no PEM certificate in '{redis.certificate_file}'", ("redis", "certificate_file")
            )
        key_file = redis.private_key_file or redis.certificate_file
        key_pem = _read_pem(key_file, "private_key_file") if redis.private_key_file else cert_pem
        try:
            client = ssl.PrivateCertificate.loadPEM(  # type: ignore[no-untyped-call]
                certs[0][0] + b"\n" + key_pem
            )
        except Exception:  # noqa: BLE001 - OpenSSL has many ways to refuse
            # Never quote the key file's content or OpenSSL's view of it.
            raise ConfigError(
                f"'{key_file}' holds no readable private key for the client certificate",
                ("redis", "private_key_file" if redis.private_key_file else "certificate_file"),
            ) from None
        chain = [c.original for _, c in certs[1:]]
    if not verify:
        logger.warning(
            "Redis: TLS server certificate verification is off (tls_verify=False) for %s",
            redis.host,
        )
        options = ssl.CertificateOptions(
            privateKey=client.privateKey.original if client else None,
            certificate=client.original if client else None,
            extraCertChain=chain or None,
            verify=False,
        )
        # TLSMemoryBIOFactory accepts a context factory as well as a creator.
        return cast(IOpenSSLClientConnectionCreator, options)
    cas = _ca_certificates(redis)
    trust = ssl.trustRootFromCertificates(cas) if cas else None  # type: ignore[no-untyped-call]  # None: the system's CAs
    extra: dict[str, Any] = {"extraCertChain": chain} if chain else {}
    return ssl.optionsForClientTLS(
        redis.host,
        trustRoot=trust,
        clientCertificate=client,
        extraCertificateOptions=extra or None,
    )
