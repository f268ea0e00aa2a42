#!/usr/bin/env python3
"""The broker's scenario through zeep, a generic SOAP client, from the WSDL the GCS serves.

    zeep_broker.py --wsdl URL --gid GID [--cts-type TYPE] [--ca PEM] [--cert PEM --key PEM]

Loads the WSDL and every schema it imports from the service alone (the transport refuses any
other host and every local file: what it fetched is in "loaded"), then calls FindCTS,
DoCheckpoint (twice, once over SOAP 1.2), GetCheckpoints and DoCheckpoint for an unknown GID;
validates every response body and fault detail against schemas/gca.xsd; prints one JSON object
with what it saw. Exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gca_schemas  # noqa: E402
from lxml import etree  # noqa: E402
from zeep import Plugin  # noqa: E402
from zeep.exceptions import Fault  # noqa: E402

SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP12 = "http://www.w3.org/2003/05/soap-envelope"


class Validate(Plugin):
    """Validates every received body payload (or fault detail) against gca.xsd."""

    def __init__(self, schema: etree.XMLSchema):
        self.schema = schema
        self.validated: list[str] = []
        self.errors: list[str] = []

    def ingress(self, envelope, http_headers, operation):
        body = envelope.find(f"{{{SOAP11}}}Body")
        if body is None:
            body = envelope.find(f"{{{SOAP12}}}Body")
        payload = body[0]
        if etree.QName(payload).localname == "Fault":
            detail = payload.find("detail")
            if detail is None:
                detail = payload.find(f"{{{SOAP12}}}Detail")
            payload = detail[0]
        element = copy.deepcopy(payload)
        if self.schema.validate(etree.ElementTree(element)):
            self.validated.append(etree.QName(payload).localname)
        else:
            self.errors.append(f"{etree.QName(payload).text}: {self.schema.error_log}")
        return envelope, http_headers


def soap12_service(client):
    for service in client.wsdl.services.values():
        for port in service.ports.values():
            if "soap12" in type(port.binding).__name__.lower():
                return client.bind(service.name, port.name)
    raise SystemExit("the WSDL has no SOAP 1.2 port")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--wsdl", required=True)
    ap.add_argument("--gid", required=True)
    ap.add_argument("--cts-type", default="criu")
    gca_schemas.add_tls_arguments(ap)
    args = ap.parse_args()

    validator = Validate(gca_schemas.gca_schema())
    client = gca_schemas.zeep_client(args.wsdl, ca=args.ca, cert=args.cert, key=args.key,
                                     plugins=[validator])
    out: dict = {"loaded": list(client.transport.loaded)}

    found = client.service.FindCTS(CTSType=args.cts_type)
    offers = found if isinstance(found, list) else (found or [])
    out["find"] = sorted(o.Instance.Name for o in offers)
    out["execute_wrapper"] = offers[0].ExecuteWrapper.Name if offers else None

    ck = client.service.DoCheckpoint(GID=args.gid, Stop=False)
    out["checkpoint"] = {"id": ck.CheckpointID, "sequence": ck.SequenceNumber, "image": ck.ImageName}

    ck12 = soap12_service(client).DoCheckpoint(GID=args.gid, Stop=False)
    out["checkpoint12"] = {"id": ck12.CheckpointID, "sequence": ck12.SequenceNumber}

    # One page (Checkpoint*, then Next when more follow): follow Next until it is absent.
    items, after = [], None
    while True:
        page = client.service.GetCheckpoints(GID=args.gid, After=after)
        items.extend(page.Checkpoint or [])
        if page.Next is None:
            break
        after = page.Next
    out["sequences"] = [c.SequenceNumber for c in items]

    try:
        client.service.DoCheckpoint(GID="no-such-gid", Stop=False)
        out["fault"] = None
    except Fault as f:
        out["fault"] = etree.QName(f.detail[0]).text if f.detail is not None else f.code
        out["fault_message"] = f.message

    out["validated"] = validator.validated
    out["schema_errors"] = validator.errors
    print(json.dumps(out))
    return 1 if validator.errors else 0


if __name__ == "__main__":
    sys.exit(main())
