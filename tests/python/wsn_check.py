#!/usr/bin/env python3
"""WS-BaseNotification on the GCS, checked against the OASIS schemas with lxml.

Runs a small notification consumer (an HTTP server on 127.0.0.1), subscribes it at the GCS
to gca:JobFinished for one job, renews the subscription, provokes the faults, destroys the
job's WS-Resource (which is a JobFinished event), receives the wsnt:Notify, unsubscribes, and
validates every response, fault detail and the Notify against gca.xsd and the OASIS
b-2/t-1/bf-2/rl-2/WS-Addressing schemas it imports. Prints a JSON summary; exit status 1 on
any schema error.

    wsn_check.py --url http://127.0.0.1:PORT/wsrf/services/GridCheckpointService --gid job-1
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gca_schemas  # noqa: E402
from lxml import etree  # noqa: E402
from wsrf_check import Validator, ZeepValidate, post  # noqa: E402

WSNT = "http://docs.oasis-open.org/wsn/b-2"
BW = "http://docs.oasis-open.org/wsn/bw-2"
SIMPLE = "http://docs.oasis-open.org/wsn/t-1/TopicExpression/Simple"
RLW = "http://docs.oasis-open.org/wsrf/rlw-2"
SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"
WSA = "http://www.w3.org/2005/08/addressing"
CONSUMER_NS = "urn:test:consumer"

received: list[tuple[dict, bytes]] = []


class Consumer(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        length = int(self.headers.get("Content-Length", "0"))
        received.append((dict(self.headers), self.rfile.read(length)))
        self.send_response(202)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True, help="the GCS SOAP endpoint")
    ap.add_argument("--gid", required=True, help="a registered, running job")
    args = ap.parse_args()

    server = HTTPServer(("127.0.0.1", 0), Consumer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    consumer = f"http://127.0.0.1:{server.server_address[1]}/consumer"

    validator = Validator(gca_schemas.gca_schema())
    statuses = {}
    ns = f'xmlns:wsnt="{WSNT}"'

    def call(name, url, action, body):
        status, env = post(url, action, body)
        statuses[name] = status
        return validator.check(env)

    def subscribe_body(filter_xml: str, extra: str = "") -> str:
        return (
            f"<wsnt:Subscribe {ns}><wsnt:ConsumerReference><wsa:Address>{consumer}</wsa:Address>"
            f'<wsa:ReferenceParameters><c:ConsumerKey xmlns:c="{CONSUMER_NS}">c-1</c:ConsumerKey></wsa:ReferenceParameters>'
            f"</wsnt:ConsumerReference><wsnt:Filter>{filter_xml}</wsnt:Filter>{extra}</wsnt:Subscribe>"
        )

    def topic(t: str, dialect: str = SIMPLE) -> str:
        return f'<wsnt:TopicExpression Dialect="{dialect}">{t}</wsnt:TopicExpression>'

    sub = call("subscribe", args.url, f"{BW}/NotificationProducer/SubscribeRequest",
               subscribe_body(topic("gca:JobFinished") + f"<gca:GID>{args.gid}</gca:GID>",
                              "<wsnt:InitialTerminationTime>PT10M</wsnt:InitialTerminationTime>"))
    sub_url = sub.find(f"{{{WSNT}}}SubscriptionReference/{{{WSA}}}Address").text
    call("renew", sub_url, f"{BW}/SubscriptionManager/RenewRequest",
         f"<wsnt:Renew {ns}><wsnt:TerminationTime>PT1H</wsnt:TerminationTime></wsnt:Renew>")
    call("sub-doc", sub_url, "http://docs.oasis-open.org/wsrf/rpw-2/GetResourcePropertyDocument/GetResourcePropertyDocumentRequest",
         "<wsrf-rp:GetResourcePropertyDocument/>")
    call("gcs-topics", args.url, "http://docs.oasis-open.org/wsrf/rpw-2/GetResourceProperty/GetResourcePropertyRequest",
         f"<wsrf-rp:GetResourceProperty {ns}>wsnt:TopicExpression</wsrf-rp:GetResourceProperty>")

    # zeep from the served WSDL: a second subscription (every topic), with its own consumer
    # reference; it receives the same JobFinished.
    client = gca_schemas.zeep_client(args.url + "?wsdl", plugins=[ZeepValidate(validator)])
    producer = client.bind("GridCheckpointService", "GCSNotificationProducerSoap11")
    zsub = producer.Subscribe(ConsumerReference={"Address": consumer + "?zeep"},
                              InitialTerminationTime="PT5M")
    zsub_url = zsub.SubscriptionReference.Address._value_1
    out_zeep = {"zeep_subscribed": zsub_url.startswith(args.url + "/subscriptions/")}

    # Faults.
    call("dialect", args.url, f"{BW}/NotificationProducer/SubscribeRequest",
         subscribe_body(topic("gca:JobFinished", "urn:x")))
    call("topic", args.url, f"{BW}/NotificationProducer/SubscribeRequest", subscribe_body(topic("gca:Nope")))
    call("expr", args.url, f"{BW}/NotificationProducer/SubscribeRequest", subscribe_body(topic("gca:A/B")))
    call("filter", args.url, f"{BW}/NotificationProducer/SubscribeRequest",
         subscribe_body('<wsnt:MessageContent Dialect="http://www.w3.org/TR/1999/REC-xpath-19991116">true()</wsnt:MessageContent>'))
    call("itt", args.url, f"{BW}/NotificationProducer/SubscribeRequest",
         subscribe_body(topic("gca:JobFinished"), "<wsnt:InitialTerminationTime>2001-01-01T00:00:00Z</wsnt:InitialTerminationTime>"))
    call("tt", sub_url, f"{BW}/SubscriptionManager/RenewRequest",
         f"<wsnt:Renew {ns}><wsnt:TerminationTime>2001-01-01T00:00:00Z</wsnt:TerminationTime></wsnt:Renew>")
    call("current", args.url, f"{BW}/NotificationProducer/GetCurrentMessageRequest",
         f'<wsnt:GetCurrentMessage {ns}><wsnt:Topic Dialect="{SIMPLE}">gca:JobFinished</wsnt:Topic></wsnt:GetCurrentMessage>')

    # The event, and its Notify.
    call("destroy", f"{args.url}/jobs/{args.gid}", f"{RLW}/ImmediateResourceTermination/DestroyRequest",
         "<wsrf-rl:Destroy/>")
    deadline = time.time() + 15
    while len(received) < 2 and time.time() < deadline:
        time.sleep(0.05)
    out: dict = {"notifications": len(received), **out_zeep}
    time.sleep(0.3)
    out["zeep_notified"] = sum(1 for _, b in received if b"?zeep" in b)
    ours = [(h, b) for h, b in received if b"?zeep" not in b]
    if ours:
        headers, body = ours[0]
        env = etree.fromstring(body)
        notify = validator.check(env)
        msg = notify.find(f"{{{WSNT}}}NotificationMessage")
        t = msg.find(f"{{{WSNT}}}Topic")
        prefix, _, local = t.text.strip().partition(":")
        out["topic"] = "{%s}%s" % (t.nsmap.get(prefix), local)
        out["dialect"] = t.get("Dialect")
        out["message"] = etree.QName(msg.find(f"{{{WSNT}}}Message")[0]).text
        out["subscription"] = msg.find(f"{{{WSNT}}}SubscriptionReference/{{{WSA}}}Address").text == sub_url
        out["action"] = env.find(f"{{{SOAP11}}}Header/{{{WSA}}}Action").text
        ref = env.find(f"{{{SOAP11}}}Header/{{{CONSUMER_NS}}}ConsumerKey")
        out["reference_parameter"] = None if ref is None else ref.text
        out["soapaction"] = headers.get("SOAPAction")

    call("unsubscribe", sub_url, f"{BW}/SubscriptionManager/UnsubscribeRequest", f"<wsnt:Unsubscribe {ns}/>")
    call("gone", sub_url, f"{BW}/SubscriptionManager/UnsubscribeRequest", f"<wsnt:Unsubscribe {ns}/>")
    manager = client.create_service(f"{{{gca_schemas.GCA_NS}}}SubscriptionResourceSoap11Binding", zsub_url)
    manager.Unsubscribe()
    out["zeep_unsubscribed"] = True
    server.shutdown()

    out["statuses"] = statuses
    out["validated"] = validator.validated
    out["schema_errors"] = validator.errors
    print(json.dumps(out, default=str))
    return 1 if validator.errors else 0


if __name__ == "__main__":
    sys.exit(main())
