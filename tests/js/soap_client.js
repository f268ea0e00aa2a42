#!/usr/bin/env node
// A second SOAP toolkit family for the GCA tests: node-soap (npm `soap`), a JavaScript client
// built at run time from the WSDL a service serves.
//
//   node soap_client.js --wsdl URL --scenario broker --gid GID [--cts-type TYPE]
//   node soap_client.js --wsdl URL --scenario cts --gid UNKNOWN_GID
//   ... [--ca PEM] [--cert PEM --key PEM]
//
// The WSDL and every schema it imports are loaded from the service alone: the HTTP client
// refuses any other origin (scheme, host, port) and reading local files is refused too; what
// was fetched is reported in "loaded".
//
// broker: the broker's scenario of tests/python/zeep_broker.py: FindCTS, DoCheckpoint over
//   SOAP 1.1, DoCheckpoint over SOAP 1.2, GetCheckpoints, then DoCheckpoint for an unknown GID
//   over SOAP 1.1 and over SOAP 1.2, whose fault detail is decoded.
// cts: DoCheckpoint at a CTS for a GID it does not run, over SOAP 1.1 and 1.2.
//
// Prints one JSON object with what it saw; exits non-zero when something failed (a call that
// should fault and did not is reported, not an exit).
'use strict';

const fs = require('fs');
const https = require('https');
const path = require('path');
const sax = require('sax');
const soap = require('soap');

const SOAP11_PORT = 'Soap11';
const SOAP12_PORT = 'Soap12';
const WSRF_R = 'http://docs.oasis-open.org/wsrf/r-2';

function parseArgs(argv) {
  const args = { scenario: 'broker', ctsType: 'criu' };
  const names = { '--wsdl': 'wsdl', '--gid': 'gid', '--scenario': 'scenario',
    '--cts-type': 'ctsType', '--ca': 'ca', '--cert': 'cert', '--key': 'key' };
  for (let i = 0; i < argv.length; i += 2) {
    const key = names[argv[i]];
    if (!key || argv[i + 1] === undefined) {
      throw new Error(`usage: soap_client.js --wsdl URL --gid GID [--scenario broker|cts] ` +
        `[--cts-type TYPE] [--ca PEM] [--cert PEM --key PEM] (bad argument ${argv[i]})`);
    }
    args[key] = argv[i + 1];
  }
  if (!args.wsdl || !args.gid) throw new Error('--wsdl and --gid are required');
  return args;
}

function origin(url) {
  const u = new URL(url);
  if (u.protocol !== 'http:' && u.protocol !== 'https:') {
    throw new Error(`not an http(s) URL: ${url}`);
  }
  return `${u.protocol}//${u.host}`;
}

// Everything the TLS files give: read before local file reads are refused.
function tlsAgent(args) {
  if (!args.ca && !args.cert) return undefined;
  return new https.Agent({
    ca: args.ca ? fs.readFileSync(args.ca) : undefined,
    cert: args.cert ? fs.readFileSync(args.cert) : undefined,
    key: args.key ? fs.readFileSync(args.key) : undefined,
  });
}

// node-soap reads a WSDL or schema location that is not http(s) with fs.readFile: refuse that,
// so that a location which is not the service's cannot be satisfied from a local copy.
function refuseLocalFiles() {
  const refuse = (name) => function refused(file) {
    const err = new Error(`refused to read the local file ${file} (${name}): only the service may be read`);
    const cb = arguments[arguments.length - 1];
    if (typeof cb === 'function') return cb(err);
    throw err;
  };
  fs.readFile = refuse('readFile');
  fs.promises.readFile = async (file) => { throw new Error(`refused to read the local file ${file}`); };
}

// The HTTP client of both the WSDL loading and the calls: only the service's origin.
class ServiceOnlyClient extends soap.HttpClient {
  constructor(allowed, agent, loaded) {
    super({});
    this.allowed = allowed;
    this.agent = agent;
    this.loaded = loaded;
  }

  request(rurl, data, callback, exheaders, exoptions) {
    let o;
    try {
      o = origin(rurl);
    } catch (e) {
      return callback(e);
    }
    if (o !== this.allowed) {
      return callback(new Error(`refused to reach ${rurl}: only ${this.allowed} may be reached`));
    }
    if (data === null || data === undefined) this.loaded.push(rurl);
    const options = Object.assign({}, exoptions || {});
    if (this.agent) options.httpsAgent = this.agent;
    return super.request(rurl, data, callback, exheaders, options);
  }
}

async function makeClient(args, httpClient, soap12) {
  return soap.createClientAsync(args.wsdl, {
    httpClient,
    forceSoap12Headers: soap12,
    returnFault: true,
    disableCache: true,
  });
}

// The port of `service` whose name ends with Soap11/Soap12 and that has `operation`.
function port(client, operation, suffix) {
  for (const [, ports] of Object.entries(client.wsdl.definitions.services)) {
    for (const [name, p] of Object.entries(ports.ports)) {
      if (name.endsWith(suffix) && p.binding.methods[operation]) {
        const service = Object.keys(client.describe()).find((s) => client[s] && client[s][name]);
        return client[service][name];
      }
    }
  }
  throw new Error(`no ${suffix} port with ${operation}`);
}

function call(method, request) {
  return new Promise((resolve, reject) => {
    method(request, (err, result, rawResponse) => (err ? reject(err) : resolve({ result, rawResponse })));
  });
}

function list(x) {
  if (x === undefined || x === null) return [];
  return Array.isArray(x) ? x : [x];
}

function text(x) {
  if (x === undefined || x === null) return null;
  if (typeof x === 'object' && '$value' in x) return x.$value;
  return x;
}

// The namespace and local name of the first element in a SOAP fault's detail, resolved by a
// namespace-aware parse of the raw response (node-soap's decoded objects drop namespaces).
function detailElement(xml) {
  const parser = sax.parser(true, { xmlns: true });
  const stack = [];
  let found = null;
  parser.onopentag = (node) => {
    const parent = stack[stack.length - 1];
    if (!found && parent && (parent.local === 'detail' || parent.local === 'Detail') &&
        stack.some((n) => n.local === 'Fault')) {
      found = { ns: node.uri, local: node.local };
    }
    stack.push({ local: node.local, uri: node.uri });
  };
  parser.onclosetag = () => stack.pop();
  parser.write(String(xml)).close();
  return found;
}

// The fault a call ended with: SOAP code and reason, and the detail element decoded by
// node-soap, with its namespace from the raw response.
function decodeFault(err) {
  const env = err.root && err.root.Envelope;
  if (!env || !env.Body || !env.Body.Fault) {
    return { error: String(err && err.message) };
  }
  const fault = env.Body.Fault;
  const soap12 = fault.Code !== undefined;
  const detail = soap12 ? fault.Detail : fault.detail;
  const [element] = Object.keys(detail || {}).filter((k) => k !== 'attributes' && k !== '$value');
  const body = detail[element];
  const raw = detailElement(err.body || '');
  const ns = raw && raw.local === element ? raw.ns : null;
  return {
    version: soap12 ? '1.2' : '1.1',
    code: soap12 ? text(fault.Code.Value) : text(fault.faultcode),
    reason: soap12 ? text(fault.Reason.Text) : text(fault.faultstring),
    element,
    ns,
    timestamp: body && text(body.Timestamp),
    error_code: body && text(body.ErrorCode),
    description: body && text(body.Description),
  };
}

async function expectFault(method, request) {
  try {
    await call(method, request);
    return { fault: null };
  } catch (err) {
    return decodeFault(err);
  }
}

async function broker(args, c11, c12, out) {
  const found = await call(port(c11, 'FindCTS', SOAP11_PORT).FindCTS, { CTSType: args.ctsType });
  const offers = list(found.result && found.result.CTS);
  out.find = offers.map((o) => o.Instance.Name).sort();
  out.execute_wrapper = offers.length ? offers[0].ExecuteWrapper.Name : null;

  const ck = await call(port(c11, 'DoCheckpoint', SOAP11_PORT).DoCheckpoint, { GID: args.gid, Stop: false });
  out.checkpoint = { id: ck.result.CheckpointID, sequence: Number(ck.result.SequenceNumber),
    image: ck.result.ImageName };

  const ck12 = await call(port(c12, 'DoCheckpoint', SOAP12_PORT).DoCheckpoint, { GID: args.gid, Stop: false });
  out.checkpoint12 = { id: ck12.result.CheckpointID, sequence: Number(ck12.result.SequenceNumber),
    soap12_envelope: /http:\/\/www\.w3\.org\/2003\/05\/soap-envelope/.test(ck12.rawResponse) };

  // One page at a time: follow Next until an answer has none.
  out.sequences = [];
  for (let after = null; ;) {
    const req = after === null ? { GID: args.gid } : { GID: args.gid, After: after };
    const page = await call(port(c11, 'GetCheckpoints', SOAP11_PORT).GetCheckpoints, req);
    out.sequences.push(...list(page.result && page.result.Checkpoint).map((c) => Number(c.SequenceNumber)));
    if (!page.result || page.result.Next === undefined || page.result.Next === null) break;
    after = page.result.Next;
  }

  out.fault11 = await expectFault(port(c11, 'DoCheckpoint', SOAP11_PORT).DoCheckpoint,
    { GID: 'no-such-gid', Stop: false });
  out.fault12 = await expectFault(port(c12, 'DoCheckpoint', SOAP12_PORT).DoCheckpoint,
    { GID: 'no-such-gid', Stop: false });
}

async function cts(args, c11, c12, out) {
  out.fault11 = await expectFault(port(c11, 'DoCheckpoint', SOAP11_PORT).DoCheckpoint,
    { GID: args.gid, Stop: false });
  out.fault12 = await expectFault(port(c12, 'DoCheckpoint', SOAP12_PORT).DoCheckpoint,
    { GID: args.gid, Stop: false });
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const agent = tlsAgent(args);
  const version = JSON.parse(fs.readFileSync(path.join(__dirname, 'node_modules', 'soap', 'package.json'))).version;
  refuseLocalFiles();
  const loaded = [];
  const http = new ServiceOnlyClient(origin(args.wsdl), agent, loaded);
  const c11 = await makeClient(args, http, false);
  const c12 = await makeClient(args, http, true);
  const out = { toolkit: `node-soap ${version}`, loaded: [...new Set(loaded)] };
  // The fault element, as the toolkit knows it from the schemas it loaded (r-2.xsd).
  out.fault_declared = Boolean(c11.wsdl.findSchemaObject(WSRF_R, 'ResourceUnknownFault'));
  if (args.scenario === 'broker') {
    await broker(args, c11, c12, out);
  } else if (args.scenario === 'cts') {
    await cts(args, c11, c12, out);
  } else {
    throw new Error(`unknown scenario ${args.scenario}`);
  }
  process.stdout.write(`${JSON.stringify(out)}\n`);
}

main().catch((err) => {
  process.stderr.write(`soap_client.js: ${err && err.stack ? err.stack : err}\n`);
  if (err && err.body) process.stderr.write(`response body: ${err.body}\n`);
  process.exit(1);
});
