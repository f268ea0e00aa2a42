#!/usr/bin/env python3
"""Checks the published GCA schemas and WSDL (schemas/) offline.

    python3 tests/python/check_schemas.py [--instances PATH ...] [--require-tools]

1. gca.xsd and cts-descriptor.xsd compile (lxml/libxml2; also xmlschema and xmllint when
   installed) from schemas/ alone, with no network: every import names a file of schemas/
   (the OASIS WSRF/WSN and W3C schemas are copies there, schemas/README.md).
2. Every schemas/examples/*.xml is a valid CTS descriptor and every
   schemas/examples/invalid/*.xml is not (each against both schemas).
3. gca.xsd declares the request and response element of every operation of
   protocol/src/ops.rs and the fault elements of protocol/src/fault.rs.
4. gcs.wsdl and cts.wsdl carry every operation of ops.rs with the right actions, faults,
   bindings (SOAP 1.1 and 1.2) and addresses; and, when zeep is installed, zeep loads them,
   finds every operation in both bindings and builds requests that gca.xsd accepts.
5. With --instances: every XML file given (or *.xml in a directory given) validates against
   gca.xsd: a bare GCA element, or a SOAP 1.1/1.2 envelope whose body (and fault detail) holds
   GCA or WSRF elements.

Prints one line per check and ends with "N passed, M failed"; exits 1 if any check failed.
Checks whose optional tool is missing print SKIP and are not counted (with --require-tools
they fail instead).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gca_schemas  # noqa: E402
from gca_schemas import GCA_NS, REPO_ROOT, SCHEMAS_DIR, WSDL_NS, XSD_NS  # noqa: E402
from lxml import etree  # noqa: E402

SOAP11_BIND = "http://schemas.xmlsoap.org/wsdl/soap/"
SOAP12_BIND = "http://schemas.xmlsoap.org/wsdl/soap12/"
SOAP11_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP12_ENV = "http://www.w3.org/2003/05/soap-envelope"
WSAM = "http://www.w3.org/2007/05/addressing/metadata"
WSA = "http://www.w3.org/2005/08/addressing"
HTTP_TRANSPORT = "http://schemas.xmlsoap.org/soap/http"

# Faults every operation declares, and the least each operation must declare besides.
COMMON_FAULTS = {
    "InvalidMessageFault",
    "InternalFault",
    "AccessDeniedFault",
    "PayloadTooLargeFault",
    "ActionNotSupportedFault",
}
REQUIRED_FAULTS = {
    "DoCheckpoint": {"ResourceUnknownFault", "ResourceUnavailableFault", "OperationFailedFault"},
    "GetCheckpoints": {"ResourceUnknownFault"},
    "GetRecoveryInfo": {"ResourceUnknownFault"},
    "GetJob": {"ResourceUnknownFault"},
    "SetRetention": {"ResourceUnknownFault"},
    "RegisterCheckpointerClass": {"ConflictFault"},
    "RegisterCTSDescriptor": {"ConflictFault", "InvalidDescriptorFault"},
    "UnregisterCTS": {"ResourceUnknownFault"},
    "RegisterCTSInstance": {"ConflictFault"},
    "RegisterJob": {"ConflictFault", "ResourceUnknownFault"},
    "RegisterCheckpoint": {"ConflictFault", "ResourceUnknownFault"},
    "JobFinished": {"ResourceUnknownFault"},
}

SERVICES = {
    # wsdl file: (port type constant in ns.rs, ops.rs operations! block, address)
    "gcs.wsdl": ("GCS_PORT_TYPE", "http://localhost:8080/wsrf/services/GridCheckpointService"),
    "cts.wsdl": ("CTS_PORT_TYPE", "http://localhost:8090/wsrf/services/CheckpointTranslationService"),
}


# ------------------------------------------------------------------------------------------
# Reporting


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0
        self.require_tools = False

    def ok(self, name: str, detail: str = "") -> None:
        self.passed += 1
        print(f"PASS  {name}" + (f" ({detail})" if detail else ""))

    def fail(self, name: str, why: str) -> None:
        self.failed += 1
        print(f"FAIL  {name}: {why}")

    def skip(self, name: str, why: str) -> None:
        if self.require_tools:
            self.fail(name, why + " (--require-tools)")
        else:
            print(f"SKIP  {name}: {why}")

    def check(self, name: str, problems: list[str], detail: str = "") -> bool:
        if problems:
            shown = problems[:6]
            more = f"; ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
            self.fail(name, "; ".join(shown) + more)
            return False
        self.ok(name, detail)
        return True


def first_error(log) -> str:
    e = log.last_error if log.last_error is not None else None
    errs = list(log)
    if errs:
        e = errs[0]
    if e is None:
        return "(no message)"
    return f"line {e.line}: {e.message}"


# ------------------------------------------------------------------------------------------
# What the Rust sources say


def rust_string_consts(text: str) -> dict[str, str]:
    return dict(re.findall(r'pub const (\w+): &str = "([^"]*)";', text))


def read_contract(repo: Path) -> dict:
    src = repo / "protocol" / "src"
    ns = rust_string_consts((src / "ns.rs").read_text())
    ops_rs = (src / "ops.rs").read_text()
    fault_rs = (src / "fault.rs").read_text()

    m = re.search(r"pub const GCS_OPERATIONS: &\[&str\] = &\[(.*?)\];", ops_rs, re.S)
    if not m:
        raise ValueError("GCS_OPERATIONS not found in ops.rs")
    gcs_list = re.findall(r'"(\w+)"', m.group(1))

    blocks: dict[str, list[str]] = {}
    for bm in re.finditer(r"operations!\s*\{\s*ns::(\w+);(.*?)\n\}", ops_rs, re.S):
        blocks[bm.group(1)] = re.findall(r'=\s*"(\w+)"\s*:', bm.group(2))
    if "GCS_PORT_TYPE" not in blocks or "CTS_PORT_TYPE" not in blocks:
        raise ValueError("operations! blocks for GCS_PORT_TYPE / CTS_PORT_TYPE not found in ops.rs")

    nsmap = {k: ns[k] for k in ("GCA", "WSRF_R", "WSRF_BF", "WSRF_RP", "WSRF_RL", "WSNT")}
    faults = []
    for ns_const, name in re.findall(r'FaultKind::\w+\s*=>\s*\{?\s*\(ns::(\w+),\s*"(\w+)"\)', fault_rs):
        faults.append((nsmap.get(ns_const, ns_const), name))
    if not faults:
        raise ValueError("no fault detail elements found in fault.rs")

    return {
        "ns": ns,
        "gcs_list": gcs_list,
        "ops": {"GCS_PORT_TYPE": blocks["GCS_PORT_TYPE"], "CTS_PORT_TYPE": blocks["CTS_PORT_TYPE"]},
        "port_types": {"GCS_PORT_TYPE": ns["GCS_PORT_TYPE"], "CTS_PORT_TYPE": ns["CTS_PORT_TYPE"]},
        "faults": faults,
        "fault_action": ns["FAULT_ACTION"],
    }


def request_action(gca: str, port: str, op: str) -> str:
    return f"{gca}/{port}/{op}Request"


def response_action(gca: str, port: str, op: str) -> str:
    return f"{gca}/{port}/{op}Response"


# ------------------------------------------------------------------------------------------
# Schemas and examples


def check_compile(rep: Report) -> dict:
    schemas = {}
    for name in ("cts-descriptor.xsd", "gca.xsd"):
        try:
            schemas[name] = gca_schemas.load_schema(SCHEMAS_DIR / name)
            rep.ok(f"{name} compiles (lxml)")
        except (etree.XMLSchemaParseError, etree.XMLSyntaxError, OSError) as e:
            rep.fail(f"{name} compiles (lxml)", str(e))
    return schemas


def check_examples(rep: Report, schemas: dict) -> tuple[list[Path], list[Path]]:
    valid = sorted((SCHEMAS_DIR / "examples").glob("*.xml"))
    invalid = sorted((SCHEMAS_DIR / "examples" / "invalid").glob("*.xml"))
    if not valid:
        rep.fail("valid examples exist", "no schemas/examples/*.xml")
    if not invalid:
        rep.fail("invalid examples exist", "no schemas/examples/invalid/*.xml")
    for path in valid:
        rel = path.relative_to(REPO_ROOT)
        problems = []
        try:
            doc = etree.parse(str(path))
        except etree.XMLSyntaxError as e:
            rep.fail(f"{rel} is valid", f"not well-formed: {e}")
            continue
        for sname, schema in schemas.items():
            if not schema.validate(doc):
                problems.append(f"{sname}: {first_error(schema.error_log)}")
        rep.check(f"{rel} is valid", problems, "against " + " and ".join(schemas) if schemas else "")
    for path in invalid:
        rel = path.relative_to(REPO_ROOT)
        text = path.read_text(encoding="utf-8")
        problems = []
        if not re.match(r"\s*<!--", text):
            problems.append("does not start with a comment saying what is wrong")
        why = ""
        try:
            doc = etree.parse(str(path))
        except etree.XMLSyntaxError as e:
            rep.fail(f"{rel} is invalid", f"not well-formed (it should be well-formed but schema-invalid): {e}")
            continue
        for sname, schema in schemas.items():
            if schema.validate(doc):
                problems.append(f"{sname} accepts it")
            elif not why:
                why = first_error(schema.error_log)
        rep.check(f"{rel} is invalid", problems, why)
    return valid, invalid


def global_elements(xsd_path: Path) -> dict[str, etree._Element]:
    """Global element declarations of a schema document and the documents it includes."""
    out = {}
    seen = set()
    todo = [xsd_path]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        root = etree.parse(str(p)).getroot()
        for el in root.findall(f"{{{XSD_NS}}}element"):
            out[el.get("name")] = el
        for inc in root.findall(f"{{{XSD_NS}}}include"):
            todo.append(p.parent / inc.get("schemaLocation"))
    return out


def check_declarations(rep: Report, contract: dict, schemas: dict) -> None:
    decls = global_elements(SCHEMAS_DIR / "gca.xsd")
    for key, ops in contract["ops"].items():
        port = contract["port_types"][key]
        missing = [n for op in ops for n in (op, op + "Response") if n not in decls]
        rep.check(
            f"gca.xsd declares the request/response elements of the {len(ops)} {port} operations",
            [f"missing global element(s): {', '.join(missing)}"] if missing else [],
        )
    gca = schemas.get("gca.xsd")
    if gca is None:
        return
    bf = contract["ns"]["WSRF_BF"]
    for fns, name in contract["faults"]:
        problems = []
        if fns == GCA_NS and name not in decls:
            problems.append("not declared")
        else:
            # Elements some WS-BaseNotification faults add after the BaseFault content
            # (what protocol/src/wsn.rs sends with them).
            extra = {
                "InvalidFilterFault": "<f:UnknownFilter>f:MessageContent</f:UnknownFilter>",
                "UnacceptableInitialTerminationTimeFault": "<f:MinimumTime>2025-01-31T12:00:00Z</f:MinimumTime>",
                "UnacceptableTerminationTimeFault": "<f:MinimumTime>2025-01-31T12:00:00Z</f:MinimumTime>",
            }.get(name, "") if fns == contract["ns"].get("WSNT") else ""
            good = etree.fromstring(
                f'<f:{name} xmlns:f="{fns}" xmlns:bf="{bf}"><bf:Timestamp>2025-01-31T12:00:00Z</bf:Timestamp>'
                f'<bf:ErrorCode dialect="urn:gca:v1:error-codes">x</bf:ErrorCode>'
                f'<bf:Description xml:lang="en">d</bf:Description>{extra}</f:{name}>'
            )
            bad = etree.fromstring(f'<f:{name} xmlns:f="{fns}"/>')
            if not gca.validate(good):
                problems.append(f"a BaseFault instance is rejected: {first_error(gca.error_log)}")
            if gca.validate(bad):
                problems.append("accepted without wsrf-bf:Timestamp (type does not extend wsrf-bf:BaseFaultType?)")
        prefix = "gca" if fns == GCA_NS else "wsrf-r" if fns == contract["ns"]["WSRF_R"] else fns
        rep.check(f"fault element {prefix}:{name} is a WS-BaseFault", problems)


def check_with_xmlschema(rep: Report, valid: list[Path], invalid: list[Path]) -> None:
    name = "xmlschema: both schemas compile from schemas/ alone (sandbox) and agree on the examples"
    try:
        import xmlschema  # type: ignore
    except ImportError:
        rep.skip(name, "xmlschema is not installed")
        return

    problems = []
    for sname in ("cts-descriptor.xsd", "gca.xsd"):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                # allow="sandbox": only files under the schema's own directory, no network.
                s = xmlschema.XMLSchema10(str(SCHEMAS_DIR / sname), allow="sandbox")
            problems.extend(f"{sname}: {w.message}" for w in caught)
        except Exception as e:  # xmlschema raises several exception types
            problems.append(f"{sname}: {e}".splitlines()[0])
            continue
        for p in valid:
            if not s.is_valid(str(p)):
                problems.append(f"{sname} rejects {p.name}")
        for p in invalid:
            if s.is_valid(str(p)):
                problems.append(f"{sname} accepts invalid/{p.name}")
    rep.check(name, problems)


def check_with_xmllint(rep: Report, valid: list[Path], invalid: list[Path]) -> None:
    name = "xmllint --nonet --schema gca.xsd (no catalog): examples valid, invalid ones rejected"
    exe = shutil.which("xmllint")
    if not exe:
        rep.skip(name, "xmllint is not installed (apt-get install libxml2-utils)")
        return
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        # An empty catalog, so that no system catalog can stand in for a missing file.
        cat = Path(tmp) / "catalog.xml"
        cat.write_text('<?xml version="1.0"?>\n<catalog xmlns="urn:oasis:names:tc:entity:xmlns:xml:catalog"/>\n')
        env = dict(os.environ, XML_CATALOG_FILES=str(cat))
        base = [exe, "--nonet", "--noout", "--schema", str(SCHEMAS_DIR / "gca.xsd")]
        if valid:
            r = subprocess.run(base + [str(p) for p in valid], env=env, capture_output=True, text=True)
            if r.returncode != 0:
                problems.append(f"rejects valid examples (exit {r.returncode}): " + r.stderr.strip().splitlines()[-1])
        for p in invalid:
            r = subprocess.run(base + [str(p)], env=env, capture_output=True, text=True)
            if r.returncode != 3:  # 3: the document does not validate
                problems.append(f"invalid/{p.name}: exit {r.returncode}, expected 3")
    rep.check(name, problems)


def check_instances(rep: Report, schema, paths: list[str]) -> None:
    files: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files.extend(sorted(path.glob("*.xml")))
        else:
            files.append(path)
    if not files:
        rep.fail("--instances", f"no XML files in {', '.join(paths)}")
        return
    for f in files:
        name = f"instance {f} validates against gca.xsd"
        try:
            root = etree.parse(str(f)).getroot()
        except (etree.XMLSyntaxError, OSError) as e:
            rep.fail(name, str(e))
            continue
        targets = []
        q = etree.QName(root)
        if q.localname == "Envelope" and q.namespace in (SOAP11_ENV, SOAP12_ENV):
            body = root.find(f"{{{q.namespace}}}Body")
            for child in body if body is not None else []:
                cq = etree.QName(child)
                if cq.localname == "Fault" and cq.namespace == q.namespace:
                    detail = child.find("detail")
                    if detail is None:
                        detail = child.find(f"{{{SOAP12_ENV}}}Detail")
                    targets.extend(list(detail) if detail is not None else [])
                else:
                    targets.append(child)
            if not targets:
                rep.fail(name, "the envelope has no body element to validate")
                continue
        else:
            targets.append(root)
        problems = []
        for t in targets:
            if not schema.validate(etree.ElementTree(_standalone(t))):
                problems.append(f"<{etree.QName(t).localname}>: {first_error(schema.error_log)}")
        rep.check(name, problems)


def _standalone(el):
    """A copy of el as the root of its own document, keeping the namespaces in scope."""
    return etree.fromstring(etree.tostring(el))


# ------------------------------------------------------------------------------------------
# WSDL, statically


def qn(el, attr):
    """Resolves a QName attribute value against the element's namespace map."""
    v = el.get(attr)
    if v is None:
        return None
    prefix, _, local = v.rpartition(":")
    return (el.nsmap.get(prefix or None), local)


def check_wsdl_static(rep: Report, contract: dict, wsdl_name: str) -> None:
    port_key, address = SERVICES[wsdl_name]
    port = contract["port_types"][port_key]
    ops = contract["ops"][port_key]
    gca = contract["ns"]["GCA"]
    label = f"{wsdl_name} (static)"
    path = SCHEMAS_DIR / wsdl_name
    try:
        text = path.read_text(encoding="utf-8")
        root = etree.fromstring(text.encode("utf-8"))
    except (OSError, etree.XMLSyntaxError) as e:
        rep.fail(f"{label} is well-formed", str(e))
        return
    W = f"{{{WSDL_NS}}}"

    # Types: the schema is imported by a relative location the server can rewrite.
    problems = []
    imports = root.findall(f"{W}types/{{{XSD_NS}}}schema/{{{XSD_NS}}}import")
    if not any(i.get("namespace") == gca and i.get("schemaLocation") == "gca.xsd" for i in imports):
        problems.append('no <xsd:import namespace="urn:gca:v1" schemaLocation="gca.xsd"/> in wsdl:types')
    if root.get("targetNamespace") != gca:
        problems.append(f"targetNamespace is {root.get('targetNamespace')!r}")
    rep.check(f"{label}: types import gca.xsd", problems)

    # Messages.
    messages = {m.get("name"): m for m in root.findall(f"{W}message")}

    def part_element(msg_q):
        if msg_q is None or msg_q[0] != root.get("targetNamespace"):
            return None
        m = messages.get(msg_q[1])
        if m is None:
            return None
        parts = m.findall(f"{W}part")
        if len(parts) != 1:
            return ("<%d parts>" % len(parts), "")
        return qn(parts[0], "element")

    # Port type.
    pts = root.findall(f"{W}portType")
    pt = next((p for p in pts if p.get("name") == port), None)
    if pt is None:
        rep.fail(f"{label}: portType {port}", f"not found (found {[p.get('name') for p in pts]})")
        return
    problems = []
    names = [o.get("name") for o in pt.findall(f"{W}operation")]
    if names != ops:
        problems.append(f"operations {names} differ from ops.rs {ops}")
    pt_faults: dict[str, set[str]] = {}
    fault_elements = {name: ns for ns, name in contract["faults"]}
    for o in pt.findall(f"{W}operation"):
        op = o.get("name")
        inp, out = o.find(f"{W}input"), o.find(f"{W}output")
        if inp is None or out is None:
            problems.append(f"{op}: no input or output")
            continue
        if inp.get(f"{{{WSAM}}}Action") != request_action(gca, port, op):
            problems.append(f"{op}: input wsam:Action is {inp.get(f'{{{WSAM}}}Action')!r}")
        if out.get(f"{{{WSAM}}}Action") != response_action(gca, port, op):
            problems.append(f"{op}: output wsam:Action is {out.get(f'{{{WSAM}}}Action')!r}")
        if part_element(qn(inp, "message")) != (gca, op):
            problems.append(f"{op}: input message is not one part element gca:{op}")
        if part_element(qn(out, "message")) != (gca, op + "Response"):
            problems.append(f"{op}: output message is not one part element gca:{op}Response")
        fs = set()
        for f in o.findall(f"{W}fault"):
            fname = f.get("name")
            fs.add(fname)
            if f.get(f"{{{WSAM}}}Action") != contract["fault_action"]:
                problems.append(f"{op}: fault {fname} wsam:Action is {f.get(f'{{{WSAM}}}Action')!r}")
            if fname not in fault_elements:
                problems.append(f"{op}: fault {fname} is not a fault of fault.rs")
            elif part_element(qn(f, "message")) != (fault_elements[fname], fname):
                problems.append(f"{op}: fault {fname} message does not carry the {fname} element")
        missing = (COMMON_FAULTS | REQUIRED_FAULTS.get(op, set())) - fs
        if missing:
            problems.append(f"{op}: missing fault(s) {sorted(missing)}")
        pt_faults[op] = fs
    rep.check(f"{label}: portType {port} has the {len(ops)} operations with actions and faults", problems)

    # Bindings.
    bindings = [b for b in root.findall(f"{W}binding") if qn(b, "type") == (root.get("targetNamespace"), port)]
    found_versions = {}
    for b in bindings:
        for ns_uri, ver in ((SOAP11_BIND, "1.1"), (SOAP12_BIND, "1.2")):
            sb = b.find(f"{{{ns_uri}}}binding")
            if sb is not None:
                found_versions[ver] = (b, ns_uri, sb)
    for ver in ("1.1", "1.2"):
        name = f"{label}: SOAP {ver} binding has every operation (document/literal, soapAction)"
        if ver not in found_versions:
            rep.fail(name, "no such binding")
            continue
        b, ns_uri, sb = found_versions[ver]
        S = f"{{{ns_uri}}}"
        problems = []
        if sb.get("style", "document") != "document":
            problems.append(f"style {sb.get('style')}")
        if sb.get("transport") != HTTP_TRANSPORT:
            problems.append(f"transport {sb.get('transport')}")
        bops = {o.get("name"): o for o in b.findall(f"{W}operation")}
        if sorted(bops) != sorted(ops):
            problems.append(f"operations {sorted(bops)} differ from ops.rs {sorted(ops)}")
        for op, o in bops.items():
            so = o.find(f"{S}operation")
            if so is None or so.get("soapAction") != request_action(gca, port, op):
                problems.append(f"{op}: soapAction is {None if so is None else so.get('soapAction')!r}")
            if so is not None and so.get("style", "document") != "document":
                problems.append(f"{op}: style {so.get('style')}")
            for io in ("input", "output"):
                body = o.find(f"{W}{io}/{S}body")
                if body is None or body.get("use") != "literal":
                    problems.append(f"{op}: {io} is not soap:body use=literal")
            bf = {f.get("name") for f in o.findall(f"{W}fault")}
            if bf != pt_faults.get(op, set()):
                problems.append(f"{op}: binding faults differ from the portType's")
            for f in o.findall(f"{W}fault"):
                sf = f.find(f"{S}fault")
                if sf is None or sf.get("name") != f.get("name") or sf.get("use") != "literal":
                    problems.append(f"{op}: fault {f.get('name')} is not soap:fault name=... use=literal")
        rep.check(name, problems)

    # Service.
    problems = []
    svc = root.find(f"{W}service[@name='{port}']")
    if svc is None:
        problems.append(f"no service named {port}")
    else:
        seen = set()
        for p in svc.findall(f"{W}port"):
            b = qn(p, "binding")
            for ver, (bel, ns_uri, _) in found_versions.items():
                if b == (root.get("targetNamespace"), bel.get("name")):
                    addr = p.find(f"{{{ns_uri}}}address")
                    loc = addr.get("location") if addr is not None else None
                    if loc != address:
                        problems.append(f"SOAP {ver} port address is {loc!r}, expected {address!r}")
                    seen.add(ver)
        for ver in ("1.1", "1.2"):
            if ver not in seen:
                problems.append(f"no port for the SOAP {ver} binding")
    rep.check(f"{label}: service {port} has SOAP 1.1 and 1.2 ports at {address}", problems)


def check_self_contained(rep: Report) -> None:
    """Every import and include of every file of schemas/ (inline WSDL schemas too) names another
    file of schemas/ by a relative location, which the services rewrite to their served copy."""
    problems = []
    files = sorted(SCHEMAS_DIR.glob("*.xsd")) + sorted(SCHEMAS_DIR.glob("*.wsdl"))
    for p in files:
        root = etree.parse(str(p), gca_schemas.make_parser()).getroot()
        for el in root.iter(f"{{{XSD_NS}}}import", f"{{{XSD_NS}}}include", f"{{{XSD_NS}}}redefine"):
            loc = el.get("schemaLocation")
            if loc is None:
                if el.tag.endswith("import") and el.get("namespace") == GCA_NS:
                    problems.append(f"{p.name}: imports urn:gca:v1 without a schemaLocation")
                continue
            if "://" in loc or loc.startswith("/") or "/" in loc:
                problems.append(f"{p.name}: schemaLocation {loc!r} is not a file of schemas/")
            elif not (SCHEMAS_DIR / loc).is_file():
                problems.append(f"{p.name}: schemaLocation {loc!r} does not exist in schemas/")
    rep.check(f"every import of the {len(files)} files of schemas/ names a file of schemas/", problems)


# ------------------------------------------------------------------------------------------
# WSDL with zeep

SAMPLE_TIME = dt.datetime(2025, 1, 31, 12, 0, 0, tzinfo=dt.timezone.utc)


def sample_requests(client) -> dict:
    """Keyword arguments for one zeep call of each operation."""
    descriptor_el = etree.parse(str(SCHEMAS_DIR / "examples" / "criu-cts.xml")).getroot()
    descriptor = client.get_element(f"{{{GCA_NS}}}CTSDescriptor").parse(descriptor_el, client.wsdl.types)
    instance = {
        "Name": "cts-node1",
        "Type": "criu",
        "URL": "https://node1.example.org:8090/wsrf/services/CheckpointTranslationService",
        "ExecutionManager": "https://node1.example.org:8443/em",
        "Resource": "node1.example.org",
    }
    return {
        "DoCheckpoint": {"GID": "job-1", "Stop": True},
        "FindCTS": {"CheckpointerClass": "basic", "Property": [{"Name": "network", "Value": "none"}],
                    "AliveWithinSeconds": 120},
        "GetCheckpoints": {"GID": "job-1"},
        "GetRecoveryInfo": {"GID": "job-1", "Image": "latest"},
        "AuthorizeRecovery": {"GID": "job-1", "CTSInstance": "node-b-criu"},
        "AbandonRecovery": {"GID": "job-1", "CTSInstance": "node-b-criu"},
        "GetJobKey": {"GID": "job-1"},
        "SetImageLocation": {"GID": "job-1", "CheckpointID": "ck-1", "Location": {
            "Kind": "object-store", "Name": "s3://gca/site", "State": "stored"}},
        "GetJob": {"GID": "job-1"},
        "ListJobs": {"State": "running", "After": "job-0", "Limit": 50},
        "SetRetention": {"GID": "job-1", "Retention": {
            "Keep": "last", "KeepLast": 2, "KeepIn": "/home/alice/checkpoints"}},
        "RegisterCheckpointerClass": {"CheckpointerClass": {
            "Name": "single-process", "Description": "one process, no sockets",
            "Property": [{"Name": "processes", "Value": "single"}]}},
        "RegisterCTSDescriptor": {"CTSDescriptor": descriptor},
        "UnregisterCTS": {"Instance": "cts-node1"},
        "ListCheckpointerClasses": {},
        "ListCTSTypes": {},
        "ListCTSInstances": {},
        "RegisterCTSInstance": {"CTSInstance": instance},
        "RegisterJob": {"GID": "job-1", "CTSInstance": "cts-node1", "LocalID": "4242"},
        "RegisterCheckpoint": {"Checkpoint": {
            "CheckpointID": "ck-1", "GID": "job-1", "CTSName": "cts-node1", "CTSType": "criu",
            "TakenAt": SAMPLE_TIME, "ImageName": "job-1/ck-1",
            "ExecutionManager": "https://node1.example.org:8443/em", "Origin": "external",
            "JobStopped": False}},
        "JobFinished": {"GID": "job-1", "CTSInstance": "cts-node1", "ExitStatus": 0},
    }


def check_zeep(rep: Report, contract: dict, wsdl_name: str, gca_schema) -> None:
    label = f"{wsdl_name} (zeep)"
    try:
        import zeep  # type: ignore
    except ImportError:
        rep.skip(f"{label} loads", "zeep is not installed")
        return
    port_key, address = SERVICES[wsdl_name]
    port = contract["port_types"][port_key]
    gca = contract["ns"]["GCA"]
    ops = contract["gcs_list"] if port_key == "GCS_PORT_TYPE" else contract["ops"][port_key]
    try:
        # zeep only warns about a message part it cannot resolve, and then drops the operations
        # using it: count its warnings as failures.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            client = gca_schemas.zeep_file_client(SCHEMAS_DIR / wsdl_name)
    except Exception as e:  # zeep raises many exception types while loading
        rep.fail(f"{label} loads", f"{type(e).__name__}: {e}")
        return
    if not rep.check(f"{label} loads", [f"{w.category.__name__}: {w.message}" for w in caught],
                     f"zeep {getattr(zeep, '__version__', '?')}"):
        return

    # The bindings of this port type (the WSRF port types have bindings of their own).
    bindings = [b for b in client.wsdl.bindings.values()
                if etree.QName(b.port_type.name).localname == port]
    kinds = {type(b).__name__: b for b in bindings}
    for kind in ("Soap11Binding", "Soap12Binding"):
        name = f"{label}: {kind} has every {port} operation of ops.rs"
        b = kinds.get(kind)
        if b is None:
            rep.fail(name, f"no {kind} (found {sorted(kinds)})")
            continue
        problems = []
        for op in ops:
            o = b._operations.get(op)
            if o is None:
                problems.append(f"{op} missing")
                continue
            if o.soapaction != request_action(gca, port, op):
                problems.append(f"{op}: soapAction {o.soapaction!r}")
            if o.abstract.wsa_action != request_action(gca, port, op):
                problems.append(f"{op}: wsa action {o.abstract.wsa_action!r}")
            if o.input.body is None or o.input.body.qname != etree.QName(gca, op):
                problems.append(f"{op}: input body element {getattr(o.input.body, 'qname', None)}")
            if o.output.body is None or o.output.body.qname != etree.QName(gca, op + "Response"):
                problems.append(f"{op}: output body element {getattr(o.output.body, 'qname', None)}")
        extra = sorted(set(b._operations) - set(ops))
        if extra:
            problems.append(f"operations not in ops.rs: {extra}")
        rep.check(name, problems)

    # Requests built by zeep carry WS-Addressing headers and validate against gca.xsd.
    name = f"{label}: zeep requests for every operation carry wsa:Action and validate against gca.xsd"
    if gca_schema is None:
        rep.fail(name, "gca.xsd did not compile")
        return
    problems = []
    try:
        samples = sample_requests(client)
    except Exception as e:
        rep.fail(name, f"building the samples: {type(e).__name__}: {e}")
        return
    for kind, b in kinds.items():
        svc = client.bind(next(iter(client.wsdl.services)),
                          next(p.name for s in client.wsdl.services.values()
                               for p in s.ports.values() if p.binding is b))
        for op in ops:
            if op not in samples:
                problems.append(f"no sample request for {op} in check_schemas.py")
                continue
            try:
                env = client.create_message(svc, op, **samples[op])
            except Exception as e:
                problems.append(f"{kind} {op}: zeep cannot build it: {type(e).__name__}: {e}")
                continue
            action = env.find(f"{{*}}Header/{{{WSA}}}Action")
            if action is None or action.text != request_action(gca, port, op):
                problems.append(f"{kind} {op}: wsa:Action header {None if action is None else action.text!r}")
            to = env.find(f"{{*}}Header/{{{WSA}}}To")
            if to is None or to.text != address:
                problems.append(f"{kind} {op}: wsa:To {None if to is None else to.text!r}")
            body = env.find("{*}Body")
            if body is None or len(body) != 1:
                problems.append(f"{kind} {op}: body does not hold one element")
                continue
            if not gca_schema.validate(etree.ElementTree(_standalone(body[0]))):
                problems.append(f"{kind} {op}: {first_error(gca_schema.error_log)}")
    rep.check(name, problems)


# ------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", metavar="PATH", action="append", default=[],
                    help="also validate these XML files (or *.xml in these directories) "
                         "against gca.xsd; repeatable")
    ap.add_argument("--require-tools", action="store_true",
                    help="fail, instead of skipping, the checks whose tool (zeep, xmlschema, "
                         "xmllint) is missing")
    args = ap.parse_args(argv)

    rep = Report()
    rep.require_tools = args.require_tools

    try:
        contract = read_contract(REPO_ROOT)
        rep.ok("operations and faults read from protocol/src (ops.rs, ns.rs, fault.rs)",
               f"{len(contract['ops']['GCS_PORT_TYPE'])} GCS + {len(contract['ops']['CTS_PORT_TYPE'])} CTS "
               f"operations, {len(contract['faults'])} faults")
    except (OSError, ValueError, KeyError) as e:
        rep.fail("operations and faults read from protocol/src (ops.rs, ns.rs, fault.rs)", str(e))
        contract = None

    if contract is not None:
        gl, ol = contract["gcs_list"], contract["ops"]["GCS_PORT_TYPE"]
        rep.check("ops.rs: GCS_OPERATIONS lists the GCS operations! block in order",
                  [] if gl == ol else [f"GCS_OPERATIONS {gl} vs operations! {ol}"])

    schemas = check_compile(rep)
    valid, invalid = check_examples(rep, schemas)
    check_with_xmlschema(rep, valid, invalid)
    check_with_xmllint(rep, valid, invalid)
    check_self_contained(rep)
    if contract is not None:
        check_declarations(rep, contract, schemas)
        for wsdl_name in SERVICES:
            check_wsdl_static(rep, contract, wsdl_name)
        for wsdl_name in SERVICES:
            check_zeep(rep, contract, wsdl_name, schemas.get("gca.xsd"))
    if args.instances:
        if "gca.xsd" in schemas:
            check_instances(rep, schemas["gca.xsd"], args.instances)
        else:
            rep.fail("--instances", "gca.xsd did not compile")

    print(f"{rep.passed} passed, {rep.failed} failed")
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
