"""TLS contexts from a link URL's ``ca=``, ``cert=`` and ``key=`` options, for every TLS link.

``tls://``, ``https://`` and ``mqtts://`` take the same three options and build
their contexts here: TLS 1.2 at least; a client verifies the server against
``ca`` (else the system's CAs) and presents ``cert``/``key`` when given; a
server presents ``cert``/``key`` and, with ``ca``, asks clients for a
certificate from that CA. :mod:`ssl` is imported only when a TLS link is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agent.errors import UsageError

if TYPE_CHECKING:
    import ssl

    from hw.link import LinkURL

__all__ = ["check_tls_files", "client_context", "origin_of", "server_context"]


#: what each TLS option of a URL must hold, as a PEM marker and in words
_TLS_FILES = {"ca": (b"-----BEGIN CERTIFICATE-----", "a PEM certificate (the site CA)"),
              "cert": (b"-----BEGIN CERTIFICATE-----", "a PEM certificate"),
              "key": (b"PRIVATE KEY-----", "a PEM private key")}
#: a CA bundle may hold many certificates; a key or certificate is a few KiB
_TLS_FILE_MAX = 4 * 1024 * 1024


def check_tls_files(url: LinkURL) -> None:
    """Each TLS file of ``url`` exists and holds what its option says, named if not.

    ``ssl`` alone would say only "PEM lib" or "no certificate or crl found".

    Raises:
        UsageError: ``URL: cannot load the TLS files: ca=FILE is a request file, expected
        a PEM certificate (the site CA)``.
    """
    from agent.formats import describe_kind, identify

    for opt, (marker, words) in _TLS_FILES.items():
        path = url.option(opt)
        if not path:
            continue
        try:
            with open(path, "rb") as f:
                data = f.read(_TLS_FILE_MAX + 1)
        except FileNotFoundError as exc:
            raise UsageError(f"{url.text}: cannot load the TLS files: {opt}={path}: "
                             f"no such file") from exc
        except OSError as exc:
            raise UsageError(f"{url.text}: cannot load the TLS files: {opt}={path}: "
                             f"{exc.strerror or exc}") from exc
        if marker not in data[:_TLS_FILE_MAX]:
            raise UsageError(f"{url.text}: cannot load the TLS files: {opt}={path} is "
                             f"{describe_kind(identify(data))}, expected {words}")


def client_context(url: LinkURL) -> ssl.SSLContext:
    """The client side: verify the server (``ca=``), present ``cert=``/``key=`` if given.

    Raises:
        UsageError: ``key=`` without ``cert=``, or a TLS file that cannot be loaded.
    """
    import ssl

    ca, cert, key = url.option("ca"), url.option("cert"), url.option("key")
    if key and not cert:
        raise UsageError(f"{url.text}: key= needs cert= (the client certificate)")
    check_tls_files(url)
    try:
        ctx = ssl.create_default_context(cafile=ca or None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert:
            ctx.load_cert_chain(cert, key or None)
    except OSError as exc:  # ssl.SSLError is an OSError
        raise UsageError(f"{url.text}: cannot load the TLS files: {exc}") from exc
    return ctx


def server_context(url: LinkURL, usage: str, require_client_cert: bool | None = None
                   ) -> ssl.SSLContext:
    """The server side: present ``cert=``/``key=``; with ``ca=``, ask for client certificates.

    Args:
        usage: how the URL should look, for the error when ``cert``/``key`` are missing.
        require_client_cert: with ``ca=``, refuse clients without a certificate
            (default: yes when ``ca=`` is given).

    Raises:
        UsageError: no certificate or key, a requirement without ``ca=``, or a TLS
            file that cannot be loaded.
    """
    import ssl

    cert, key, ca = url.option("cert"), url.option("key"), url.option("ca")
    if not cert or not key:
        raise UsageError(f"{url.text}: a listener needs its certificate and key ({usage})")
    require = bool(ca) if require_client_cert is None else require_client_cert
    if require and not ca:
        raise UsageError(f"{url.text}: require_client_cert needs ca=PATH "
                         f"(the CA that signs client certificates)")
    check_tls_files(url)
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(cert, key)
        if ca:
            ctx.load_verify_locations(cafile=ca)
            ctx.verify_mode = ssl.CERT_REQUIRED if require else ssl.CERT_OPTIONAL
    except OSError as exc:  # ssl.SSLError is an OSError
        raise UsageError(f"{url.text}: cannot load the TLS files: {exc}") from exc
    return ctx


def origin_of(scheme: str, sock: Any, host: str) -> str:
    """Who a server-side connection is, for the requests it makes (:func:`agent.rpc.for_origin`):
    ``SCHEME cert CN=NAME sha256:FINGERPRINT`` (the first 16 hex digits of the SHA-256 of
    the client certificate) when the peer presented one, else ``SCHEME HOST``."""
    getpeercert = getattr(sock, "getpeercert", None)
    der: bytes | None = None
    subject: Any = ()
    if callable(getpeercert):
        try:
            der = getpeercert(binary_form=True)
            subject = (getpeercert() or {}).get("subject", ()) if der else ()
        except (OSError, ValueError):  # a connection already closed
            der = None
    if not der:
        return f"{scheme} {host}"
    from agent.digest import sha256

    names = [v for rdn in subject for k, v in rdn if k == "commonName"]
    cn = "".join(ch if ch.isprintable() else "?" for ch in (names[0] if names else ""))[:64]
    return f"{scheme} cert CN={cn} sha256:{sha256(der).hex()[:16]}"
