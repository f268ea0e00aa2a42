#!/usr/bin/env python3
"""zeep against a CTS, from the WSDL the CTS serves and nothing else.

    zeep_cts.py --wsdl URL --gid UNKNOWN_GID [--ca PEM] [--cert PEM --key PEM]

Loads the WSDL and every schema it imports from the CTS alone (the transport refuses any other
host and every local file), calls DoCheckpoint for a GID the CTS does not run over SOAP 1.1 and
SOAP 1.2, and prints one JSON object: what was loaded, and per SOAP version the fault detail's
element and message, validated against schemas/gca.xsd. Exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gca_schemas  # noqa: E402
from lxml import etree  # noqa: E402
from zeep.exceptions import Fault  # noqa: E402
from zeep_broker import Validate, soap12_service  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--wsdl", required=True)
    ap.add_argument("--gid", required=True, help="a GID the CTS does not run")
    gca_schemas.add_tls_arguments(ap)
    args = ap.parse_args()

    validator = Validate(gca_schemas.gca_schema())
    client = gca_schemas.zeep_client(args.wsdl, ca=args.ca, cert=args.cert, key=args.key,
                                     plugins=[validator])
    out: dict = {"loaded": list(client.transport.loaded)}
    for version, service in (("soap11", client.service), ("soap12", soap12_service(client))):
        try:
            service.DoCheckpoint(GID=args.gid, Stop=False)
            out[version] = {"fault": None}
        except Fault as f:
            out[version] = {
                "fault": etree.QName(f.detail[0]).text if f.detail is not None else None,
                "message": f.message,
            }
    out["validated"] = validator.validated
    out["schema_errors"] = validator.errors
    print(json.dumps(out))
    return 1 if validator.errors else 0


if __name__ == "__main__":
    sys.exit(main())
