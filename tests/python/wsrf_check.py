#!/usr/bin/env python3
"""WSRF 1.2 on the GCS, checked from outside: zeep from the served WSDL, raw SOAP for the rest,
and every response body and fault detail validated with lxml against gca.xsd and the official
OASIS schemas it imports (rp-2, rl-2, r-2, bf-2, WS-Addressing 1.0).

    wsrf_check.py --url http://127.0.0.1:PORT/wsrf/services/GridCheckpointService --gid GID

The GCS must know job GID with at least two checkpoints and one CTS instance. Calls through
zeep GetResourceProperty on the GCS and on the job resource (by the job's address, the way a
client that cannot echo reference parameters reaches it) and QueryResourceProperties on the job;
then every WS-RP / WS-RL operation and fault as raw SOAP 1.1 and 1.2. Destroys the job at the
end. Prints one JSON object; exits non-zero when a payload does not validate.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gca_schemas  # noqa: E402
from lxml import etree  # noqa: E402
from zeep import Plugin  # noqa: E402

SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP12 = "http://www.w3.org/2003/05/soap-envelope"
WSA = "http://www.w3.org/2005/08/addressing"
RP = "http://docs.oasis-open.org/wsrf/rp-2"
RL = "http://docs.oasis-open.org/wsrf/rl-2"
GCA = "urn:gca:v1"
XPATH = "http://www.w3.org/TR/1999/REC-xpath-19991116"
RPW = "http://docs.oasis-open.org/wsrf/rpw-2"
RLW = "http://docs.oasis-open.org/wsrf/rlw-2"


class Validator:
    def __init__(self, schema: etree.XMLSchema):
        self.schema = schema
        self.validated: list[str] = []
        self.errors: list[str] = []

    def payload(self, envelope) -> etree._Element:
        body = envelope.find(f"{{{SOAP11}}}Body")
        if body is None:
            body = envelope.find(f"{{{SOAP12}}}Body")
        payload = body[0]
        if etree.QName(payload).localname == "Fault":
            detail = payload.find("detail")
            if detail is None:
                detail = payload.find(f"{{{SOAP12}}}Detail")
            payload = detail[0]
        return payload

    def check(self, envelope) -> etree._Element:
        payload = self.payload(envelope)
        element = copy.deepcopy(payload)
        name = etree.QName(payload).localname
        if self.schema.validate(etree.ElementTree(element)):
            self.validated.append(name)
        else:
            self.errors.append(f"{etree.QName(payload).text}: {self.schema.error_log}")
        return payload


class ZeepValidate(Plugin):
    def __init__(self, validator: Validator):
        self.validator = validator

    def ingress(self, envelope, http_headers, operation):
        self.validator.check(envelope)
        return envelope, http_headers


class QueryText(Plugin):
    """zeep cannot write the text of the mixed-content QueryExpression: set it on the way out."""

    def __init__(self):
        self.expression = ""

    def egress(self, envelope, http_headers, operation, binding_options):
        for qe in envelope.iter(f"{{{RP}}}QueryExpression"):
            qe.text = self.expression
        return envelope, http_headers


def values(result) -> list:
    """The items of a zeep xsd:any-sequence result, as plain values."""
    if result is None:
        return []
    if hasattr(result, "_value_1"):
        result = result._value_1
    if not isinstance(result, list):
        result = [result]
    out = []
    for x in result:
        if isinstance(x, etree._Element):
            out.append(x.text)
        elif hasattr(x, "_value_1") and not isinstance(x, (str, int)):
            out.append(x._value_1)
        else:
            out.append(x)
    return out


def post(url: str, action: str, body: str, headers: str = "", soap12: bool = False):
    env_ns = SOAP12 if soap12 else SOAP11
    text = (
        f'<s:Envelope xmlns:s="{env_ns}" xmlns:wsa="{WSA}" xmlns:gca="{GCA}" '
        f'xmlns:wsrf-rp="{RP}" xmlns:wsrf-rl="{RL}" '
        f'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
        f"<s:Header><wsa:Action>{action}</wsa:Action>"
        f"<wsa:MessageID>urn:uuid:00000000-0000-4000-8000-000000000001</wsa:MessageID>{headers}</s:Header>"
        f"<s:Body>{body}</s:Body></s:Envelope>"
    )
    ct = f'application/soap+xml; charset=utf-8; action="{action}"' if soap12 else "text/xml; charset=utf-8"
    req = urllib.request.Request(url, data=text.encode(), headers={"Content-Type": ct}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=20, context=gca_schemas.ssl_context()) as resp:
            return resp.status, etree.fromstring(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, etree.fromstring(e.read())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True, help="the GCS SOAP endpoint")
    ap.add_argument("--gid", required=True)
    args = ap.parse_args()

    validator = Validator(gca_schemas.gca_schema())
    qtext = QueryText()
    client = gca_schemas.zeep_client(args.url + "?wsdl", plugins=[ZeepValidate(validator), qtext])
    out: dict = {}
    job_url = f"{args.url}/jobs/{args.gid}"

    # --- zeep, from the served WSDL -------------------------------------------------------
    gcs_rp = client.bind("GridCheckpointService", "GCSResourceSoap11")
    out["zeep_job_count"] = values(gcs_rp.GetResourceProperty("gca:JobCount"))[0]
    job_rp = client.create_service(f"{{{GCA}}}JobResourceSoap11Binding", job_url)
    out["zeep_job_state"] = values(job_rp.GetResourceProperty("gca:State"))[0]
    qtext.expression = "/gca:JobResourceProperties/gca:Checkpoint[gca:SequenceNumber = 2]/gca:CheckpointID"
    out["zeep_query_ids"] = values(job_rp.QueryResourceProperties(QueryExpression={"Dialect": XPATH}))
    job12 = client.create_service(f"{{{GCA}}}JobResourceSoap12Binding", job_url)
    out["zeep_soap12_gid"] = values(job12.GetResourceProperty("gca:GID"))[0]

    # --- raw SOAP: every operation and fault ------------------------------------------------
    def rp(op: str) -> str:
        return f"{RPW}/{op}/{op}Request"

    statuses = {}

    def call(name, url, action, body, headers="", soap12=False):
        status, env = post(url, action, body, headers, soap12)
        statuses[name] = status
        return validator.check(env)

    doc = call("gcs-doc", args.url, rp("GetResourcePropertyDocument"), "<wsrf-rp:GetResourcePropertyDocument/>")
    instance = doc.find(f"{{{GCA}}}GCSResourceProperties/{{{GCA}}}CTSInstanceEntry/{{{GCA}}}Name")
    job_doc = call("job-doc", job_url, rp("GetResourcePropertyDocument"), "<wsrf-rp:GetResourcePropertyDocument/>")
    ck = job_doc.find(f"{{{GCA}}}JobResourceProperties/{{{GCA}}}Checkpoint/{{{GCA}}}CheckpointID")
    call("ck-doc", f"{args.url}/checkpoints/{ck.text}", rp("GetResourcePropertyDocument"),
         "<wsrf-rp:GetResourcePropertyDocument/>", soap12=True)
    call("instance-doc", f"{args.url}/instances/{instance.text}", rp("GetResourcePropertyDocument"),
         "<wsrf-rp:GetResourcePropertyDocument/>")
    call("get", args.url, rp("GetResourceProperty"),
         "<wsrf-rp:GetResourceProperty>gca:Checkpoint</wsrf-rp:GetResourceProperty>",
         headers=f'<gca:ResourceID wsa:IsReferenceParameter="true" Kind="jobs">{args.gid}</gca:ResourceID>')
    call("multi", job_url, rp("GetMultipleResourceProperties"),
         "<wsrf-rp:GetMultipleResourceProperties><wsrf-rp:ResourceProperty>gca:State</wsrf-rp:ResourceProperty>"
         "<wsrf-rp:ResourceProperty>wsrf-rl:CurrentTime</wsrf-rp:ResourceProperty>"
         "<wsrf-rp:ResourceProperty>wsrf-rl:TerminationTime</wsrf-rp:ResourceProperty>"
         "</wsrf-rp:GetMultipleResourceProperties>")
    call("query", args.url, rp("QueryResourceProperties"),
         f'<wsrf-rp:QueryResourceProperties><wsrf-rp:QueryExpression Dialect="{XPATH}">'
         "//gca:CTSInstanceEntry</wsrf-rp:QueryExpression></wsrf-rp:QueryResourceProperties>")
    # Results that are not elements (a number, a text node, nothing) in gca:QueryResult.
    call("query-number", job_url, rp("QueryResourceProperties"),
         f'<wsrf-rp:QueryResourceProperties><wsrf-rp:QueryExpression Dialect="{XPATH}">'
         "count(//gca:Checkpoint)</wsrf-rp:QueryExpression></wsrf-rp:QueryResourceProperties>")
    call("query-text", job_url, rp("QueryResourceProperties"),
         f'<wsrf-rp:QueryResourceProperties><wsrf-rp:QueryExpression Dialect="{XPATH}">'
         "/*/gca:GID/text()</wsrf-rp:QueryExpression></wsrf-rp:QueryResourceProperties>")
    call("query-empty", job_url, rp("QueryResourceProperties"),
         f'<wsrf-rp:QueryResourceProperties><wsrf-rp:QueryExpression Dialect="{XPATH}">'
         "//gca:Nothing</wsrf-rp:QueryExpression></wsrf-rp:QueryResourceProperties>")
    call("getjob", args.url, "urn:gca:v1/GridCheckpointService/GetJobRequest",
         f"<gca:GetJob><gca:GID>{args.gid}</gca:GID></gca:GetJob>")
    call("set-tt", job_url, f"{RLW}/ScheduledResourceTermination/SetTerminationTimeRequest",
         "<wsrf-rl:SetTerminationTime><wsrf-rl:RequestedLifetimeDuration>PT1H</wsrf-rl:RequestedLifetimeDuration>"
         "</wsrf-rl:SetTerminationTime>")
    call("set-tt-nil", job_url, f"{RLW}/ScheduledResourceTermination/SetTerminationTimeRequest",
         '<wsrf-rl:SetTerminationTime><wsrf-rl:RequestedTerminationTime xsi:nil="true"/>'
         "</wsrf-rl:SetTerminationTime>", soap12=True)

    # Faults.
    call("unknown", f"{args.url}/jobs/no-such-job", rp("GetResourceProperty"),
         "<wsrf-rp:GetResourceProperty>gca:State</wsrf-rp:GetResourceProperty>")
    call("bad-qname", job_url, rp("GetResourceProperty"),
         "<wsrf-rp:GetResourceProperty>gca:Nope</wsrf-rp:GetResourceProperty>", soap12=True)
    call("bad-query", job_url, rp("QueryResourceProperties"),
         f'<wsrf-rp:QueryResourceProperties><wsrf-rp:QueryExpression Dialect="{XPATH}">//gca:X['
         "</wsrf-rp:QueryExpression></wsrf-rp:QueryResourceProperties>")
    call("eval-error", job_url, rp("QueryResourceProperties"),
         f'<wsrf-rp:QueryResourceProperties><wsrf-rp:QueryExpression Dialect="{XPATH}">nope:x</wsrf-rp:QueryExpression>'
         "</wsrf-rp:QueryResourceProperties>")
    call("dialect", job_url, rp("QueryResourceProperties"),
         '<wsrf-rp:QueryResourceProperties><wsrf-rp:QueryExpression Dialect="urn:x">x</wsrf-rp:QueryExpression>'
         "</wsrf-rp:QueryResourceProperties>")
    call("bad-tt", job_url, f"{RLW}/ScheduledResourceTermination/SetTerminationTimeRequest",
         "<wsrf-rl:SetTerminationTime><wsrf-rl:RequestedLifetimeDuration>P1Y</wsrf-rl:RequestedLifetimeDuration>"
         "</wsrf-rl:SetTerminationTime>")
    call("not-destroyed", args.url, f"{RLW}/ImmediateResourceTermination/DestroyRequest", "<wsrf-rl:Destroy/>")
    call("destroy", job_url, f"{RLW}/ImmediateResourceTermination/DestroyRequest", "<wsrf-rl:Destroy/>")

    out["statuses"] = statuses
    out["validated"] = validator.validated
    out["schema_errors"] = validator.errors
    print(json.dumps(out, default=str))
    return 1 if validator.errors else 0


if __name__ == "__main__":
    sys.exit(main())
