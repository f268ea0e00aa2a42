"""The GCA schemas and WSDL for the Python tests, offline.

Everything the contract imports is in the repository's schemas/ directory (GCA's own files and
copies of the OASIS WSRF 1.2 / WSN 1.3 and W3C schemas, schemas/README.md), every import is a
relative location there, and the services serve the same files under /wsrf/schemas/ with the
imports pointing at the served copies. So nothing here maps official URLs to anything: a schema
either resolves inside schemas/ (files) or at the service (HTTP), and any other access fails.

    load_schema(path)     an lxml.etree.XMLSchema of a file of schemas/, compiled without network
    gca_schema()          schemas/gca.xsd, compiled
    descriptor_schema()   schemas/cts-descriptor.xsd, compiled
    zeep_client(wsdl)     a zeep Client for a served WSDL whose transport reaches the WSDL's
                          own origin (scheme, host, port) and nothing else: no other host, no
                          local file; client.transport.loaded lists what it fetched
    zeep_file_client(p)   a zeep Client for a WSDL file of schemas/, allowed to read schemas/
                          and nothing else
    add_tls_arguments(ap) --ca, --cert, --key for a script's argparse parser; pass the parsed
                          values to zeep_client(..., ca=, cert=, key=)

Only lxml is required; zeep is imported by the zeep functions alone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union
from urllib.parse import urlsplit

from lxml import etree

PathLike = Union[str, os.PathLike]

#: The repository root (this file is tests/python/gca_schemas.py).
REPO_ROOT = Path(__file__).resolve().parents[2]
#: The published schemas and WSDL, with the standards' schemas they import.
SCHEMAS_DIR = REPO_ROOT / "schemas"

GCA_NS = "urn:gca:v1"
XSD_NS = "http://www.w3.org/2001/XMLSchema"
WSDL_NS = "http://schemas.xmlsoap.org/wsdl/"
WSRF_BF_NS = "http://docs.oasis-open.org/wsrf/bf-2"
WSRF_R_NS = "http://docs.oasis-open.org/wsrf/r-2"


class NetworkRefused(RuntimeError):
    """A schema or request would have left the allowed origin (or read a local file)."""


def make_parser(**kwargs) -> etree.XMLParser:
    """An lxml parser that never uses the network (imports resolve as files only). Extra
    keyword arguments go to lxml.etree.XMLParser."""
    kwargs.setdefault("no_network", True)
    kwargs.setdefault("resolve_entities", False)
    return etree.XMLParser(**kwargs)


def load_schema(path: PathLike) -> etree.XMLSchema:
    """Compiles an XSD file (e.g. schemas/gca.xsd) with its imports read from its directory.
    Raises lxml.etree.XMLSchemaParseError when the schema is not valid or an import is missing."""
    doc = etree.parse(str(path), make_parser())
    return etree.XMLSchema(doc)


def gca_schema() -> etree.XMLSchema:
    """schemas/gca.xsd, compiled."""
    return load_schema(SCHEMAS_DIR / "gca.xsd")


def descriptor_schema() -> etree.XMLSchema:
    """schemas/cts-descriptor.xsd, compiled."""
    return load_schema(SCHEMAS_DIR / "cts-descriptor.xsd")


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL."""
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise NetworkRefused(f"not an http(s) URL: {url!r}")
    return (u.scheme, u.hostname.lower(), u.port or (443 if u.scheme == "https" else 80))


def add_tls_arguments(ap) -> None:
    """Adds --ca (CA bundle to verify the service with), --cert and --key (client certificate
    and key, PEM) to an argparse parser."""
    ap.add_argument("--ca", help="CA certificates (PEM) to verify an https service with")
    ap.add_argument("--cert", help="client certificate (PEM), for services that require one")
    ap.add_argument("--key", help="the client certificate's private key (PEM)")


def tls_files():
    """The client TLS files every GCA client takes from the environment: (ca, cert, key),
    each None when unset (GCA_CA, GCA_CERT, GCA_KEY)."""
    get = lambda k: os.environ.get(k) or None  # noqa: E731
    return get("GCA_CA"), get("GCA_CERT"), get("GCA_KEY")


def ssl_context(ca: Optional[str] = None, cert: Optional[str] = None,
                key: Optional[str] = None):
    """An ssl.SSLContext trusting `ca` and presenting `cert`/`key` (each defaulting to
    GCA_CA, GCA_CERT, GCA_KEY), for urllib."""
    import ssl

    env = tls_files()
    ca, cert, key = ca or env[0], cert or env[1], key or env[2]
    ctx = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


def _session(allowed: set, ca: Optional[str], cert: Optional[str], key: Optional[str]):
    import requests

    env = tls_files()
    ca, cert, key = ca or env[0], cert or env[1], key or env[2]

    class OriginSession(requests.Session):
        """A requests session that refuses every URL outside `allowed` (before connecting)."""

        def request(self, method, url, *args, **kwargs):
            if origin(url) not in allowed:
                raise NetworkRefused(f"{method} {url}: only {sorted(allowed)} may be reached")
            return super().request(method, url, *args, **kwargs)

    s = OriginSession()
    if ca:
        # Else REQUESTS_CA_BUNDLE and the like would replace it.
        s.trust_env = False
        s.verify = ca
    if cert:
        s.cert = (cert, key) if key else cert
    return s


def zeep_transport(wsdl: Optional[str] = None, files: Optional[PathLike] = None,
                   ca: Optional[str] = None, cert: Optional[str] = None,
                   key: Optional[str] = None, **kwargs):
    """A zeep Transport that reaches only the origin of `wsdl` (an http(s) URL) over HTTP and
    reads only files under `files` (a directory), and records every URL or file it loaded in
    `.loaded`. Extra keyword arguments go to zeep.Transport."""
    from zeep.transports import Transport

    allowed = {origin(wsdl)} if wsdl and "://" in wsdl else set()
    root = Path(files).resolve() if files is not None else None

    class OfflineTransport(Transport):
        def __init__(self, **kw):
            super().__init__(session=_session(allowed, ca, cert, key), **kw)
            self.loaded: list[str] = []

        def load(self, url):
            if not url:
                raise NetworkRefused("empty location")
            if "://" in url and not url.startswith("file://"):
                if origin(url) not in allowed:
                    self._refuse(url)
                self.loaded.append(url)
                return super().load(url)
            path = Path(url[len("file://"):] if url.startswith("file://") else url).resolve()
            if root is None or not path.is_relative_to(root):
                self._refuse(url)
            self.loaded.append(str(path))
            return path.read_bytes()

        def _refuse(self, url):
            where = f"{sorted(allowed)}" + (f" and files under {root}" if root else "")
            raise NetworkRefused(f"refused to load {url!r}: only {where} may be read")

    return OfflineTransport(**kwargs)


def zeep_client(wsdl: str, ca: Optional[str] = None, cert: Optional[str] = None,
                key: Optional[str] = None, **kwargs):
    """A zeep Client for a served WSDL (`...?wsdl`), reaching nothing but the WSDL's origin.
    Keyword arguments go to zeep.Client (transport is set here unless given)."""
    import zeep

    kwargs.setdefault("transport", zeep_transport(wsdl, ca=ca, cert=cert, key=key, timeout=30))
    return zeep.Client(wsdl, **kwargs)


def zeep_file_client(path: PathLike, **kwargs):
    """A zeep Client for a WSDL file of schemas/, reading nothing outside schemas/ and using no
    network. Keyword arguments go to zeep.Client."""
    import zeep

    kwargs.setdefault("transport", zeep_transport(files=SCHEMAS_DIR, timeout=20))
    return zeep.Client(str(path), **kwargs)
