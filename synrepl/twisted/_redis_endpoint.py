"""Where and how to connect: TCP, TLS (from :func:`synrepl.connection.tls_settings`), unix."""

from __future__ import annotations

from typing import Any, cast

from twisted.internet import ssl
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

from synrepl.config import RedisConfig
from synrepl.connection import TlsSettings, TransportOptions, tls_settings
from synrepl.errors import ConfigError

__all__ = ("make_endpoint", "tls_options")


def make_endpoint(reactor: Any, redis: RedisConfig, options: TransportOptions) -> Any:
    """An IStreamClientEndpoint for ``redis`` (typed Any: zope interfaces do not
    type-check).  TLS files are read here, once, so a bad one fails at once.

    Raises:
        ConfigError: a TLS file cannot be read or holds no certificate/key.
    """
    timeout = options.connect_timeout
    tls = tls_settings(redis, options.tls_verify)
    if redis.path:
        return UNIXClientEndpoint(  # type: ignore[no-untyped-call]
            reactor, redis.path, timeout=timeout
        )
    tcp = HostnameEndpoint(reactor, redis.host, redis.port, timeout=timeout)
    if tls is None:
        return tcp
    return wrapClientTLS(tls_options(tls), cast(Any, tcp), clock=reactor)


def _certificate(block: bytes, file: str | None, key: str) -> ssl.Certificate:
    try:
        return ssl.Certificate.loadPEM(block)
    except Exception as e:  # noqa: BLE001 - OpenSSL has many ways to refuse
        # tls_settings checked it with the ssl module already; pyOpenSSL may differ.
        raise ConfigError(
            f"'{file}' holds a certificate that cannot be read: {e}", ("redis", key)
        ) from None


def tls_options(tls: TlsSettings) -> IOpenSSLClientConnectionCreator:
    """Twisted's TLS client options for ``tls``."""
    client: ssl.PrivateCertificate | None = None
    chain: list[Any] = []
    if tls.client_chain and tls.client_key is not None:
        try:
            client = ssl.PrivateCertificate.loadPEM(  # type: ignore[no-untyped-call]
                tls.client_chain[0] + b"\n" + tls.client_key
            )
        except Exception:  # noqa: BLE001 - OpenSSL has many ways to refuse
            # Never quote the key file's content or OpenSSL's view of it.
            raise tls.key_error() from None
        chain = [
            _certificate(c, tls.certificate_file, "certificate_file").original
            for c in tls.client_chain[1:]
        ]
    if not tls.verify:
        options = ssl.CertificateOptions(
            privateKey=client.privateKey.original if client else None,
            certificate=client.original if client else None,
            extraCertChain=chain or None,
            verify=False,
        )
        # TLSMemoryBIOFactory accepts a context factory as well as a creator.
        return cast(IOpenSSLClientConnectionCreator, options)
    cas = [_certificate(c, "ca_file/ca_path", "ca_file") for c in tls.ca_certificates]
    trust = ssl.trustRootFromCertificates(cas) if cas else None  # type: ignore[no-untyped-call]  # None: the system's CAs
    extra: dict[str, Any] = {"extraCertChain": chain} if chain else {}
    return ssl.optionsForClientTLS(
        tls.server_name,
        trustRoot=trust,
        clientCertificate=client,
        extraCertificateOptions=extra or None,
    )
