"""Loading the GCA schemas and WSDL offline, for the Python tests.

gca.xsd imports the OASIS WS-BaseFaults and WS-Resource schemas by their official URLs
(http://docs.oasis-open.org/wsrf/bf-2.xsd and r-2.xsd), and bf-2.xsd in turn imports the
WS-Addressing 1.0 schema and xml.xsd. Tests run without network access, so this module maps
those URLs to local copies of the unmodified OASIS files:

    DIR/schemas/{bf-2,r-2,rp-2,rl-2,b-2,t-1,xml}.xsd
    DIR/schema/wsaddressing10/wsaddressing10.xsd

where DIR is, in order: the argument given to the functions below, the GCA_OASIS_DIR
environment variable, or ../shared/oasis next to the repository root.

    oasis_dir()        the directory of the local copies
    local_copy(url)    the local file for an official URL, or None
    make_parser()      an lxml parser that resolves the official URLs to the local copies
    load_schema(path)  an lxml.etree.XMLSchema compiled with that parser
    zeep_transport()   a zeep Transport that serves the official URLs from the local copies

Only lxml is required; zeep is imported by zeep_transport() alone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from lxml import etree

PathLike = Union[str, os.PathLike]

#: The repository root (this file is tests/python/gca_schemas.py).
REPO_ROOT = Path(__file__).resolve().parents[2]
#: The published schemas and WSDL.
SCHEMAS_DIR = REPO_ROOT / "schemas"

GCA_NS = "urn:gca:v1"
XSD_NS = "http://www.w3.org/2001/XMLSchema"
WSDL_NS = "http://schemas.xmlsoap.org/wsdl/"
WSRF_BF_NS = "http://docs.oasis-open.org/wsrf/bf-2"
WSRF_R_NS = "http://docs.oasis-open.org/wsrf/r-2"

_OASIS_WSRF = "http://docs.oasis-open.org/wsrf/"
_OASIS_WSN = "http://docs.oasis-open.org/wsn/"
# bf-2.xsd (and b-2.xsd) import "../schema/wsaddressing10/wsaddressing10.xsd"; relative to
# their official location that is this URL.
_OASIS_WSA = "http://docs.oasis-open.org/schema/wsaddressing10/wsaddressing10.xsd"
# Other names the WS-Addressing 1.0 and xml: schemas are commonly imported by.
_WSA_ALIASES = (
    "http://www.w3.org/2006/03/addressing/ws-addr.xsd",
    "http://www.w3.org/2005/08/addressing/ws-addr.xsd",
    "https://www.w3.org/2006/03/addressing/ws-addr.xsd",
)
_XML_ALIASES = (
    "http://www.w3.org/2001/xml.xsd",
    "https://www.w3.org/2001/xml.xsd",
)

_oasis_override: Optional[Path] = None


def set_oasis_dir(path: Optional[PathLike]) -> None:
    """Sets the default directory of the OASIS copies for this process (None: back to the
    environment variable or ../shared/oasis)."""
    global _oasis_override
    _oasis_override = Path(path).resolve() if path is not None else None


def oasis_dir(path: Optional[PathLike] = None) -> Path:
    """The directory holding the local copies of the OASIS schemas."""
    if path is not None:
        return Path(path).resolve()
    if _oasis_override is not None:
        return _oasis_override
    env = os.environ.get("GCA_OASIS_DIR")
    if env:
        return Path(env).resolve()
    return (REPO_ROOT.parent / "shared" / "oasis").resolve()


def local_copy(url: str, oasis: Optional[PathLike] = None) -> Optional[Path]:
    """The local file standing for an official schema URL, or None if the URL is not one of
    the OASIS / W3C schemas this module knows (or the local copy is missing)."""
    if not url:
        return None
    base = oasis_dir(oasis)
    u = url.split("#", 1)[0].split("?", 1)[0]
    if u.startswith("https://"):
        u = "http://" + u[len("https://"):]
    candidate: Optional[Path] = None
    if u == _OASIS_WSA or u in _WSA_ALIASES:
        candidate = base / "schema" / "wsaddressing10" / "wsaddressing10.xsd"
    elif u in _XML_ALIASES:
        candidate = base / "schemas" / "xml.xsd"
    else:
        for prefix in (_OASIS_WSRF, _OASIS_WSN):
            name = u[len(prefix):] if u.startswith(prefix) else ""
            if name.endswith(".xsd") and "/" not in name:
                candidate = base / "schemas" / name
    if candidate is not None and candidate.is_file():
        return candidate
    return None


class OasisResolver(etree.Resolver):
    """An lxml resolver serving the official OASIS / W3C schema URLs from local copies.

    The document is handed over with its official URL as base URL, so that the relative
    imports inside it resolve to official URLs too (and come back here)."""

    def __init__(self, oasis: Optional[PathLike] = None):
        super().__init__()
        self.oasis = oasis_dir(oasis)

    def resolve(self, system_url, public_id, context):
        path = local_copy(system_url or "", self.oasis)
        if path is None:
            return None
        return self.resolve_string(path.read_bytes(), context, base_url=system_url)


def make_parser(oasis: Optional[PathLike] = None, **kwargs) -> etree.XMLParser:
    """An lxml parser that resolves the OASIS URLs to the local copies and never uses the
    network. Extra keyword arguments go to lxml.etree.XMLParser."""
    kwargs.setdefault("no_network", True)
    kwargs.setdefault("resolve_entities", False)
    parser = etree.XMLParser(**kwargs)
    parser.resolvers.add(OasisResolver(oasis))
    return parser


def load_schema(path: PathLike, oasis: Optional[PathLike] = None) -> etree.XMLSchema:
    """Compiles an XSD file (e.g. schemas/gca.xsd) with its imports served locally.
    Raises lxml.etree.XMLSchemaParseError when the schema is not valid."""
    doc = etree.parse(str(path), make_parser(oasis))
    return etree.XMLSchema(doc)


def gca_schema(oasis: Optional[PathLike] = None) -> etree.XMLSchema:
    """schemas/gca.xsd, compiled."""
    return load_schema(SCHEMAS_DIR / "gca.xsd", oasis)


def descriptor_schema(oasis: Optional[PathLike] = None) -> etree.XMLSchema:
    """schemas/cts-descriptor.xsd, compiled."""
    return load_schema(SCHEMAS_DIR / "cts-descriptor.xsd", oasis)


def tls_files():
    """The client TLS files every GCA client takes from the environment: (ca, cert, key),
    each None when unset (GCA_CA, GCA_CERT, GCA_KEY)."""
    get = lambda k: os.environ.get(k) or None  # noqa: E731
    return get("GCA_CA"), get("GCA_CERT"), get("GCA_KEY")


def ssl_context():
    """An ssl.SSLContext trusting GCA_CA and presenting GCA_CERT/GCA_KEY (for urllib)."""
    import ssl

    ca, cert, key = tls_files()
    ctx = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
    if cert and key:
        ctx.load_cert_chain(cert, key)
    return ctx


def tls_session():
    """A requests Session trusting GCA_CA and presenting GCA_CERT/GCA_KEY (for zeep)."""
    import requests

    ca, cert, key = tls_files()
    session = requests.Session()
    if ca:
        # Else REQUESTS_CA_BUNDLE and the like would replace it.
        session.trust_env = False
        session.verify = ca
    if cert and key:
        session.cert = (cert, key)
    return session


def zeep_transport(oasis: Optional[PathLike] = None, **kwargs):
    """A zeep Transport whose load(url) serves the OASIS URLs from the local copies (and
    everything else as zeep's own Transport does: files, then HTTP). Extra keyword arguments
    go to zeep.Transport. Requires zeep."""
    from zeep.transports import Transport

    base = oasis_dir(oasis)

    class OasisTransport(Transport):
        """zeep Transport serving the official OASIS / W3C schema URLs from local copies."""

        oasis = base

        def load(self, url):
            path = local_copy(url, self.oasis)
            if path is not None:
                return path.read_bytes()
            return super().load(url)

    kwargs.setdefault("session", tls_session())
    return OasisTransport(**kwargs)


def zeep_client(wsdl: PathLike, oasis: Optional[PathLike] = None, **kwargs):
    """A zeep Client for a WSDL file or URL, loading the OASIS schemas locally.
    Keyword arguments go to zeep.Client (transport is set here unless given)."""
    import zeep

    kwargs.setdefault("transport", zeep_transport(oasis))
    return zeep.Client(str(wsdl), **kwargs)
