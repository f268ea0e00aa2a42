//! A small namespace-aware XML tree on top of quick-xml.
//!
//! SOAP messages, WS-Addressing headers and CTS descriptors are all handled as trees of
//! [`Element`]s: parsing keeps each element's namespace URI, local name, source line and the
//! namespaces in scope (needed to resolve QName-valued content), and serialization assigns
//! prefixes from a fixed table of well-known namespaces so that output is stable and readable.
//!
//! Why a tree and not serde: quick-xml's serde support matches on prefixed names and cannot
//! tell `gca:Name` from `other:Name`; SOAP peers pick their own prefixes, so every lookup here
//! is by (namespace URI, local name).
//!
//! Input comes from the network, so parsing is bounded ([`Limits`]): nesting depth, elements,
//! attributes per element, namespace declarations per element and in scope, and the text of
//! one node. Each element's namespace scope shares its parent's ([`Scope`]), so memory stays
//! linear in the input however many elements declare namespaces.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use quick_xml::events::Event;
use quick_xml::name::ResolveResult;
use quick_xml::NsReader;

/// Deepest nesting accepted from the network; real messages stay far below.
pub const MAX_DEPTH: usize = 64;

/// Bounds on one parse. [`Limits::default`] is for requests (bodies of at most 1 MiB);
/// [`Limits::response`] for the larger answers a client reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Deepest nesting of elements.
    pub max_depth: usize,
    /// Most elements in the document.
    pub max_elements: usize,
    /// Most attributes on one element, namespace declarations included (quick-xml's check for
    /// duplicate attributes costs the square of their number).
    pub max_attributes: usize,
    /// Most namespace declarations in scope at any element (each name is resolved against
    /// them).
    pub max_namespaces_in_scope: usize,
    /// Longest text of one element (or of the whole CDATA and text run), in bytes.
    pub max_text_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_depth: MAX_DEPTH,
            max_elements: 50_000,
            max_attributes: 64,
            max_namespaces_in_scope: 128,
            max_text_bytes: 512 * 1024,
        }
    }
}

impl Limits {
    /// For answers read by clients (up to 16 MiB).
    pub fn response() -> Self {
        Self {
            max_elements: 2_000_000,
            max_text_bytes: 16 * 1024 * 1024,
            ..Self::default()
        }
    }
}

/// A parse or shape error, with the 1-based source line when it is known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct XmlError {
    pub line: Option<usize>,
    pub message: String,
}

impl std::fmt::Display for XmlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl XmlError {
    pub fn new(line: Option<usize>, message: impl Into<String>) -> Self {
        Self {
            line,
            message: message.into(),
        }
    }
}

/// An attribute: namespace URI (None for unqualified), local name, value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribute {
    pub ns: Option<String>,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Element(Element),
    Text(String),
}

/// The prefix → namespace URI bindings in scope at an element ("" is the default namespace):
/// the element's own declarations and a shared reference to its parent's scope, so a
/// declaring element costs its own declarations only, never a copy of everything in scope.
#[derive(Clone, Default)]
pub struct Scope(Option<Arc<Frame>>);

struct Frame {
    bindings: Vec<(String, String)>,
    parent: Scope,
    /// Declarations in this frame and its ancestors.
    total: usize,
}

impl Scope {
    /// A scope with `bindings` declared inside `self` (later ones win).
    pub fn with(&self, bindings: Vec<(String, String)>) -> Scope {
        if bindings.is_empty() {
            return self.clone();
        }
        let total = self.declarations() + bindings.len();
        Scope(Some(Arc::new(Frame {
            bindings,
            parent: self.clone(),
            total,
        })))
    }

    /// Declarations in scope, shadowed ones included.
    pub fn declarations(&self) -> usize {
        self.0.as_ref().map_or(0, |f| f.total)
    }

    /// The namespace URI bound to `prefix`.
    pub fn get(&self, prefix: &str) -> Option<&str> {
        let mut cur = self.0.as_deref();
        while let Some(f) = cur {
            if let Some((_, u)) = f.bindings.iter().rev().find(|(p, _)| p == prefix) {
                return Some(u);
            }
            cur = f.parent.0.as_deref();
        }
        None
    }

    /// The bindings in effect, by prefix.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        let mut frames = Vec::new();
        let mut cur = self.0.as_deref();
        while let Some(f) = cur {
            frames.push(f);
            cur = f.parent.0.as_deref();
        }
        let mut out = BTreeMap::new();
        for f in frames.into_iter().rev() {
            for (p, u) in &f.bindings {
                out.insert(p.clone(), u.clone());
            }
        }
        out
    }

    /// The bindings in effect, in prefix order.
    pub fn iter(&self) -> impl Iterator<Item = (String, String)> {
        self.to_map().into_iter()
    }
}

impl PartialEq for Scope {
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (Some(a), Some(b)) if Arc::ptr_eq(a, b) => true,
            _ => self.to_map() == other.to_map(),
        }
    }
}

impl Eq for Scope {}

impl std::fmt::Debug for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.to_map()).finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    pub ns: Option<String>,
    pub name: String,
    pub attrs: Vec<Attribute>,
    pub children: Vec<Node>,
    /// 1-based line of the start tag in the parsed source (0 for built elements).
    pub line: usize,
    /// Namespaces in scope, for resolving QName values in content.
    pub scope: Scope,
}

impl Element {
    /// A new element in namespace `ns` (use `""` for no namespace).
    pub fn new(ns: &str, name: &str) -> Self {
        Self {
            ns: (!ns.is_empty()).then(|| ns.to_string()),
            name: name.to_string(),
            attrs: Vec::new(),
            children: Vec::new(),
            line: 0,
            scope: Scope::default(),
        }
    }

    /// Builder: a child element holding only text.
    pub fn with_text_child(mut self, ns: &str, name: &str, text: impl Into<String>) -> Self {
        self.push_text_child(ns, name, text);
        self
    }

    /// Builder: a child element with text, only when `text` is `Some`.
    pub fn with_opt_text_child(
        mut self,
        ns: &str,
        name: &str,
        text: Option<impl Into<String>>,
    ) -> Self {
        if let Some(t) = text {
            self.push_text_child(ns, name, t);
        }
        self
    }

    pub fn with_child(mut self, child: Element) -> Self {
        self.children.push(Node::Element(child));
        self
    }

    pub fn with_children(mut self, children: impl IntoIterator<Item = Element>) -> Self {
        self.children
            .extend(children.into_iter().map(Node::Element));
        self
    }

    pub fn with_text(mut self, text: impl Into<String>) -> Self {
        self.children.push(Node::Text(text.into()));
        self
    }

    pub fn with_attr(mut self, ns: &str, name: &str, value: impl Into<String>) -> Self {
        self.attrs.push(Attribute {
            ns: (!ns.is_empty()).then(|| ns.to_string()),
            name: name.to_string(),
            value: value.into(),
        });
        self
    }

    pub fn push_text_child(&mut self, ns: &str, name: &str, text: impl Into<String>) {
        self.children
            .push(Node::Element(Element::new(ns, name).with_text(text)));
    }

    pub fn push_child(&mut self, child: Element) {
        self.children.push(Node::Element(child));
    }

    pub fn is(&self, ns: &str, name: &str) -> bool {
        self.ns.as_deref().unwrap_or("") == ns && self.name == name
    }

    /// `{ns}name`, for messages.
    pub fn qname(&self) -> String {
        match &self.ns {
            Some(ns) => format!("{{{ns}}}{}", self.name),
            None => self.name.clone(),
        }
    }

    pub fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            Node::Text(_) => None,
        })
    }

    pub fn child(&self, ns: &str, name: &str) -> Option<&Element> {
        self.elements().find(|e| e.is(ns, name))
    }

    pub fn children_named<'a>(
        &'a self,
        ns: &'a str,
        name: &'a str,
    ) -> impl Iterator<Item = &'a Element> + 'a {
        self.elements().filter(move |e| e.is(ns, name))
    }

    pub fn attr(&self, ns: &str, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|a| a.ns.as_deref().unwrap_or("") == ns && a.name == name)
            .map(|a| a.value.as_str())
    }

    /// All descendant text, concatenated (not trimmed).
    pub fn text(&self) -> String {
        let mut out = String::new();
        self.collect_text(&mut out);
        out
    }

    fn collect_text(&self, out: &mut String) {
        for n in &self.children {
            match n {
                Node::Text(t) => out.push_str(t),
                Node::Element(e) => e.collect_text(out),
            }
        }
    }

    pub fn line_opt(&self) -> Option<usize> {
        (self.line > 0).then_some(self.line)
    }

    pub fn error(&self, message: impl Into<String>) -> XmlError {
        XmlError::new(self.line_opt(), message)
    }

    /// The trimmed text of a required child element.
    pub fn req_text(&self, ns: &str, name: &str) -> Result<String, XmlError> {
        let child = self.child(ns, name).ok_or_else(|| {
            self.error(format!(
                "<{}> is missing the required element <{name}>",
                self.name
            ))
        })?;
        let text = child.text().trim().to_string();
        if text.is_empty() {
            return Err(child.error(format!("<{name}> must not be empty")));
        }
        Ok(text)
    }

    /// The trimmed text of an optional child element; an empty element counts as absent.
    pub fn opt_text(&self, ns: &str, name: &str) -> Option<String> {
        self.child(ns, name)
            .map(|c| c.text().trim().to_string())
            .filter(|t| !t.is_empty())
    }

    pub fn opt_parse<T: std::str::FromStr>(
        &self,
        ns: &str,
        name: &str,
    ) -> Result<Option<T>, XmlError>
    where
        T::Err: std::fmt::Display,
    {
        match self.child(ns, name) {
            None => Ok(None),
            Some(c) => {
                let t = c.text();
                let t = t.trim();
                if t.is_empty() {
                    return Ok(None);
                }
                t.parse::<T>()
                    .map(Some)
                    .map_err(|e| c.error(format!("<{name}> has an invalid value {t:?}: {e}")))
            }
        }
    }

    pub fn opt_bool(&self, ns: &str, name: &str) -> Result<Option<bool>, XmlError> {
        match self.child(ns, name) {
            None => Ok(None),
            Some(c) => parse_xsd_bool(c.text().trim())
                .map(Some)
                .ok_or_else(|| c.error(format!("<{name}> must be true, false, 1 or 0"))),
        }
    }

    /// Resolves a QName written in this element's content (`prefix:local`, `local` or
    /// Clark `{ns}local`) against the namespaces in scope.
    pub fn resolve_qname(&self, value: &str) -> Option<(Option<String>, String)> {
        let value = value.trim();
        if let Some(rest) = value.strip_prefix('{') {
            let (ns, local) = rest.split_once('}')?;
            return Some(((!ns.is_empty()).then(|| ns.to_string()), local.to_string()));
        }
        match value.split_once(':') {
            Some((prefix, local)) => self
                .scope
                .get(prefix)
                .map(|ns| (Some(ns.to_string()), local.to_string())),
            None => Some((self.scope.get("").map(str::to_string), value.to_string())),
        }
    }

    /// Serializes the element as a standalone document fragment, declaring every namespace it
    /// uses on the root.
    pub fn to_xml(&self) -> String {
        let mut prefixes = Prefixes::default();
        self.collect_namespaces(&mut prefixes);
        let mut out = String::with_capacity(512);
        self.write(&mut out, &prefixes, true);
        out
    }

    /// Like [`Element::to_xml`] with an XML declaration.
    pub fn to_document(&self) -> String {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n{}",
            self.to_xml()
        )
    }

    fn collect_namespaces(&self, prefixes: &mut Prefixes) {
        if let Some(ns) = &self.ns {
            prefixes.add(ns);
        }
        for a in &self.attrs {
            if let Some(ns) = &a.ns {
                prefixes.add(ns);
            }
        }
        for c in self.elements() {
            c.collect_namespaces(prefixes);
        }
    }

    fn write(&self, out: &mut String, prefixes: &Prefixes, root: bool) {
        let tag = prefixes.qualify(self.ns.as_deref(), &self.name);
        out.push('<');
        out.push_str(&tag);
        if root {
            for (ns, prefix) in &prefixes.map {
                if ns == XML_NS {
                    continue;
                }
                let _ = write!(out, " xmlns:{prefix}=\"{}\"", escape(ns));
            }
        }
        for a in &self.attrs {
            let name = match &a.ns {
                Some(ns) => prefixes.qualify(Some(ns), &a.name),
                None => a.name.clone(),
            };
            let _ = write!(out, " {name}=\"{}\"", escape(&a.value));
        }
        if self.children.is_empty() {
            out.push_str("/>");
            return;
        }
        out.push('>');
        for c in &self.children {
            match c {
                Node::Text(t) => out.push_str(&escape(t)),
                Node::Element(e) => e.write(out, prefixes, false),
            }
        }
        out.push_str("</");
        out.push_str(&tag);
        out.push('>');
    }
}

pub fn parse_xsd_bool(s: &str) -> Option<bool> {
    match s {
        "true" | "1" => Some(true),
        "false" | "0" => Some(false),
        _ => None,
    }
}

pub const XML_NS: &str = "http://www.w3.org/XML/1998/namespace";

/// Well-known namespaces and the prefixes we emit for them.
const KNOWN_PREFIXES: &[(&str, &str)] = &[
    (crate::ns::SOAP11, "s"),
    (crate::ns::SOAP12, "env"),
    (crate::ns::WSA, "wsa"),
    (crate::ns::GCA, "gca"),
    (crate::ns::WSRF_BF, "wsrf-bf"),
    (crate::ns::WSRF_R, "wsrf-r"),
    (crate::ns::WSRF_RP, "wsrf-rp"),
    (crate::ns::WSRF_RL, "wsrf-rl"),
    (crate::ns::WSRF_SG, "wsrf-sg"),
    (crate::ns::WSNT, "wsnt"),
    (crate::ns::WSTOP, "wstop"),
    (crate::ns::XSI, "xsi"),
    (XML_NS, "xml"),
];

#[derive(Default)]
struct Prefixes {
    map: BTreeMap<String, String>,
    generated: usize,
}

impl Prefixes {
    fn add(&mut self, ns: &str) {
        if self.map.contains_key(ns) {
            return;
        }
        let prefix = KNOWN_PREFIXES
            .iter()
            .find(|(uri, _)| *uri == ns)
            .map(|(_, p)| p.to_string())
            .unwrap_or_else(|| {
                self.generated += 1;
                format!("ns{}", self.generated)
            });
        self.map.insert(ns.to_string(), prefix);
    }

    fn qualify(&self, ns: Option<&str>, local: &str) -> String {
        match ns.and_then(|ns| self.map.get(ns)) {
            Some(p) => format!("{p}:{local}"),
            None => local.to_string(),
        }
    }
}

/// Escapes text for element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\r' => out.push_str("&#13;"),
            c => out.push(c),
        }
    }
    out
}

struct LineIndex<'a> {
    src: &'a str,
    last_pos: usize,
    last_line: usize,
}

impl LineIndex<'_> {
    /// 1-based line of byte offset `pos`; offsets are asked for in increasing order.
    fn line(&mut self, pos: usize) -> usize {
        let pos = pos.min(self.src.len());
        if pos < self.last_pos {
            self.last_pos = 0;
            self.last_line = 1;
        }
        self.last_line += self.src.as_bytes()[self.last_pos..pos]
            .iter()
            .filter(|b| **b == b'\n')
            .count();
        self.last_pos = pos;
        self.last_line
    }
}

/// Parses a document within [`Limits::default`] and returns its root element.
///
/// DOCTYPE declarations are refused (no entity tricks), as is nesting deeper than
/// [`MAX_DEPTH`]. Comments and processing instructions are dropped; whitespace-only text
/// between elements is dropped too.
pub fn parse(src: &str) -> Result<Element, XmlError> {
    parse_with(src, &Limits::default())
}

/// Parses a document within `limits`; the error of a document beyond them names the limit.
pub fn parse_with(src: &str, limits: &Limits) -> Result<Element, XmlError> {
    let mut reader = NsReader::from_str(src);
    reader.config_mut().check_end_names = true;
    reader.config_mut().expand_empty_elements = false;
    let mut lines = LineIndex {
        src,
        last_pos: 0,
        last_line: 1,
    };
    let mut stack: Vec<Element> = Vec::new();
    let mut scopes: Vec<Scope> = vec![Scope::default()];
    let mut root: Option<Element> = None;
    let mut elements = 0usize;

    loop {
        let pos = reader.buffer_position() as usize;
        let (resolved, event) = match reader.read_resolved_event() {
            Ok(x) => x,
            Err(e) => {
                let at = reader.error_position() as usize;
                return Err(XmlError::new(
                    Some(lines.line(at)),
                    format!("malformed XML: {e}"),
                ));
            }
        };
        // The event starts after any leading whitespace that quick-xml skipped. (Bytes, not
        // str slicing: a position may fall inside a character, e.g. a byte order mark.)
        let start = pos
            + src.as_bytes()[pos.min(src.len())..]
                .iter()
                .take_while(|b| b.is_ascii_whitespace())
                .count();
        match event {
            Event::Start(ref e) | Event::Empty(ref e) => {
                let empty = matches!(event, Event::Empty(_));
                if root.is_some() {
                    return Err(XmlError::new(
                        Some(lines.line(start)),
                        "content after the document element",
                    ));
                }
                if stack.len() >= limits.max_depth {
                    return Err(XmlError::new(
                        Some(lines.line(start)),
                        format!("elements nested deeper than {} levels", limits.max_depth),
                    ));
                }
                elements += 1;
                if elements > limits.max_elements {
                    return Err(XmlError::new(
                        Some(lines.line(start)),
                        format!("more than {} elements", limits.max_elements),
                    ));
                }
                let line = lines.line(start);
                let ns = match resolved {
                    ResolveResult::Bound(ns) => Some(namespace(ns.as_ref(), line)?),
                    ResolveResult::Unbound => None,
                    ResolveResult::Unknown(p) => {
                        return Err(XmlError::new(
                            Some(line),
                            format!(
                                "undeclared namespace prefix {:?}",
                                String::from_utf8_lossy(&p)
                            ),
                        ))
                    }
                };
                let name = xml_name(utf8(e.local_name().as_ref(), line)?, line)?;
                let parent_scope = scopes.last().cloned().unwrap_or_default();
                let mut declared = Vec::new();
                let mut attrs = Vec::new();
                for (i, a) in e.attributes().enumerate() {
                    // Counted before quick-xml compares the next one with all before it.
                    if i >= limits.max_attributes {
                        return Err(XmlError::new(
                            Some(line),
                            format!(
                                "<{name}> has more than {} attributes (namespace declarations included)",
                                limits.max_attributes
                            ),
                        ));
                    }
                    let a = a.map_err(|err| {
                        XmlError::new(Some(line), format!("malformed attribute: {err}"))
                    })?;
                    let key = a.key.as_ref();
                    if key == b"xmlns" || key.starts_with(b"xmlns:") {
                        let prefix = if key == b"xmlns" {
                            String::new()
                        } else {
                            xml_name(utf8(&key[6..], line)?, line)?
                        };
                        let value = a.unescape_value().map_err(|err| {
                            XmlError::new(Some(line), format!("bad namespace value: {err}"))
                        })?;
                        let value = value.into_owned();
                        if value == XMLNS_NS || (value == XML_NS) != (prefix == "xml") {
                            return Err(XmlError::new(
                                Some(line),
                                format!("the namespace declaration of {prefix:?} as {value:?} is reserved"),
                            ));
                        }
                        declared.push((prefix, value));
                        if parent_scope.declarations() + declared.len()
                            > limits.max_namespaces_in_scope
                        {
                            return Err(XmlError::new(
                                Some(line),
                                format!(
                                    "more than {} namespace declarations in scope at <{name}>",
                                    limits.max_namespaces_in_scope
                                ),
                            ));
                        }
                        continue;
                    }
                    let (ans, alocal) = reader.resolve_attribute(a.key);
                    let ans = match ans {
                        ResolveResult::Bound(ns) => Some(namespace(ns.as_ref(), line)?),
                        ResolveResult::Unbound => None,
                        ResolveResult::Unknown(p) => {
                            return Err(XmlError::new(
                                Some(line),
                                format!(
                                    "undeclared namespace prefix {:?}",
                                    String::from_utf8_lossy(&p)
                                ),
                            ))
                        }
                    };
                    let value = a.unescape_value().map_err(|err| {
                        XmlError::new(Some(line), format!("bad attribute value: {err}"))
                    })?;
                    attrs.push(Attribute {
                        ns: ans,
                        name: xml_name(utf8(alocal.as_ref(), line)?, line)?,
                        value: value.into_owned(),
                    });
                }
                let scope = parent_scope.with(declared);
                let el = Element {
                    ns,
                    name,
                    attrs,
                    children: Vec::new(),
                    line,
                    scope: scope.clone(),
                };
                if empty {
                    match stack.last_mut() {
                        Some(parent) => attach(parent, el),
                        None => root = Some(el),
                    }
                } else {
                    scopes.push(scope);
                    stack.push(el);
                }
            }
            Event::End(_) => {
                scopes.pop();
                let el = stack
                    .pop()
                    .ok_or_else(|| XmlError::new(Some(lines.line(start)), "unexpected end tag"))?;
                match stack.last_mut() {
                    Some(parent) => attach(parent, el),
                    None => root = Some(el),
                }
            }
            Event::Text(t) => {
                let text = t.unescape().map_err(|e| {
                    XmlError::new(Some(lines.line(start)), format!("bad text: {e}"))
                })?;
                push_text(&mut stack, &root, text.as_ref(), limits, || {
                    lines.line(start)
                })?;
            }
            Event::CData(t) => {
                let text = String::from_utf8(t.into_inner().into_owned())
                    .map_err(|_| XmlError::new(Some(lines.line(start)), "CDATA is not UTF-8"))?;
                push_text(&mut stack, &root, &text, limits, || lines.line(start))?;
            }
            Event::DocType(_) => {
                return Err(XmlError::new(
                    Some(lines.line(start)),
                    "DOCTYPE declarations are not accepted",
                ))
            }
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
            Event::Eof => break,
        }
    }
    if let Some(open) = stack.last() {
        return Err(XmlError::new(
            Some(open.line),
            format!("element <{}> is never closed", open.name),
        ));
    }
    root.ok_or_else(|| XmlError::new(None, "the document is empty"))
}

/// Adds a child element. Whitespace before an element's first child is indentation, like the
/// whitespace between children (see [`push_text`]), and is dropped.
fn attach(parent: &mut Element, child: Element) {
    if parent.elements().next().is_none() {
        parent
            .children
            .retain(|n| !matches!(n, Node::Text(t) if t.trim().is_empty()));
    }
    parent.children.push(Node::Element(child));
}

fn push_text(
    stack: &mut [Element],
    root: &Option<Element>,
    text: &str,
    limits: &Limits,
    line: impl FnOnce() -> usize,
) -> Result<(), XmlError> {
    match stack.last_mut() {
        Some(parent) => {
            // Whitespace between elements carries no meaning in any message we read.
            if text.trim().is_empty() && parent.elements().next().is_some() {
                return Ok(());
            }
            let held = match parent.children.last() {
                Some(Node::Text(prev)) => prev.len(),
                _ => 0,
            };
            if held + text.len() > limits.max_text_bytes {
                return Err(XmlError::new(
                    Some(line()),
                    format!(
                        "<{}> holds a text of more than {} bytes",
                        parent.name, limits.max_text_bytes
                    ),
                ));
            }
            match parent.children.last_mut() {
                Some(Node::Text(prev)) => prev.push_str(text),
                _ => parent.children.push(Node::Text(text.to_string())),
            }
            Ok(())
        }
        None if text.trim().is_empty() => Ok(()),
        None => Err(XmlError::new(
            Some(line()),
            if root.is_some() {
                "text after the document element"
            } else {
                "text before the document element"
            },
        )),
    }
}

/// A local name or prefix, checked (quick-xml reads `<></>` as an element without a name).
fn xml_name(name: String, line: usize) -> Result<String, XmlError> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_alphabetic() || c == '_')
        && chars.all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | '\u{b7}'));
    if ok {
        Ok(name)
    } else {
        Err(XmlError::new(
            Some(line),
            format!("{name:?} is not an XML name"),
        ))
    }
}

/// A namespace URI as quick-xml resolves it: the declaration's raw value, which may hold
/// references (`&amp;`); unescaped like the value kept in the scope, so both agree.
/// Names may not be in it (it is the namespace of `xmlns` declarations themselves).
const XMLNS_NS: &str = "http://www.w3.org/2000/xmlns/";

fn namespace(b: &[u8], line: usize) -> Result<String, XmlError> {
    let raw = utf8(b, line)?;
    let ns = quick_xml::escape::unescape(&raw)
        .map(|u| u.into_owned())
        .map_err(|e| XmlError::new(Some(line), format!("bad namespace value: {e}")))?;
    if ns == XMLNS_NS {
        return Err(XmlError::new(
            Some(line),
            "the xmlns prefix and namespace are reserved for namespace declarations",
        ));
    }
    Ok(ns)
}

fn utf8(b: &[u8], line: usize) -> Result<String, XmlError> {
    String::from_utf8(b.to_vec()).map_err(|_| XmlError::new(Some(line), "name is not valid UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_namespaces_lines_and_text() {
        let doc = "<?xml version=\"1.0\"?>\n<a:Root xmlns:a=\"urn:a\" xmlns=\"urn:d\">\n  <Child x=\"1\">hi &amp; bye</Child>\n  <a:Q>a:Name</a:Q>\n</a:Root>";
        let root = parse(doc).unwrap();
        assert!(root.is("urn:a", "Root"));
        assert_eq!(root.line, 2);
        let child = root.child("urn:d", "Child").unwrap();
        assert_eq!(child.line, 3);
        assert_eq!(child.text(), "hi & bye");
        assert_eq!(child.attr("", "x"), Some("1"));
        let q = root.child("urn:a", "Q").unwrap();
        assert_eq!(
            q.resolve_qname(&q.text()),
            Some((Some("urn:a".to_string()), "Name".to_string()))
        );
        assert_eq!(q.resolve_qname("nope:Name"), None);
        // Indentation is no content: before the first child, between and after children.
        assert!(
            root.children.iter().all(|n| matches!(n, Node::Element(_))),
            "{:?}",
            root.children
        );
        let leaf = parse("<a>  </a>").unwrap();
        assert_eq!(leaf.text(), "  ", "a leaf keeps its whitespace text");
    }

    #[test]
    fn reports_the_line_of_malformed_input() {
        let err = parse("<a>\n<b>\n</a>").unwrap_err();
        assert_eq!(err.line, Some(3), "{err}");
        let err = parse("<a>\n<b x=1/></a>").unwrap_err();
        assert_eq!(err.line, Some(2), "{err}");
        assert!(parse("<a>").unwrap_err().message.contains("never closed"));
        assert!(parse("").is_err());
        assert!(parse("<x:a/>").unwrap_err().message.contains("undeclared"));
    }

    #[test]
    fn refuses_doctype_and_deep_nesting() {
        let err = parse("<!DOCTYPE a [<!ENTITY x \"y\">]><a>&x;</a>").unwrap_err();
        assert!(err.message.contains("DOCTYPE"), "{err}");
        let deep = "<a>".repeat(MAX_DEPTH + 1) + &"</a>".repeat(MAX_DEPTH + 1);
        assert!(parse(&deep).unwrap_err().message.contains("nested"));
    }

    /// Resident memory of this process, in bytes.
    fn rss() -> usize {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let kb: usize = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        kb * 1024
    }

    #[test]
    fn namespace_scopes_are_shared_not_copied() {
        // 127 namespaces on the root and its child, then 40,000 grandchildren that each
        // declare one more: every one used to copy the 127 bindings above it (~0.6 GB for
        // this 0.7 MB document).
        let uri = |i: usize| format!("urn:{}:{i}", "u".repeat(100));
        let decls = |range: std::ops::Range<usize>| -> String {
            range
                .map(|i| format!(" xmlns:p{i}=\"{}\"", uri(i)))
                .collect()
        };
        let mut doc = format!("<r{}><s{}>", decls(0..63), decls(63..127));
        for _ in 0..40_000 {
            doc.push_str("<c xmlns:x=\"u\"/>");
        }
        doc.push_str("</s></r>");
        assert!(doc.len() < 1024 * 1024);
        let before = rss();
        let root = parse(&doc).unwrap();
        let grown = rss().saturating_sub(before);
        let s = root.elements().next().unwrap();
        assert_eq!(s.elements().count(), 40_000);
        let last = s.elements().last().unwrap();
        assert_eq!(last.scope.get("x"), Some("u"));
        assert_eq!(last.scope.get("p126"), Some(uri(126).as_str()));
        assert_eq!(last.scope.get("p127"), None);
        assert_eq!(last.scope.to_map().len(), 128);
        assert!(grown < 64 * 1024 * 1024, "parsing took {} MB", grown >> 20);
    }

    #[test]
    fn namespace_uris_with_references_resolve_like_their_declaration() {
        // Found by the xml fuzz target: the element's namespace kept the raw "&gt;".
        let doc = "<p:a xmlns:p=\"urn:x&gt;y&amp;z\"><p:b>p:c</p:b></p:a>";
        let root = parse(doc).unwrap();
        assert_eq!(root.ns.as_deref(), Some("urn:x>y&z"));
        let b = root.elements().next().unwrap();
        assert_eq!(
            b.resolve_qname("p:c"),
            Some((Some("urn:x>y&z".to_string()), "c".to_string()))
        );
        let again = parse(&root.to_xml()).unwrap();
        assert_eq!(again.qname(), root.qname());
        assert_eq!(again.elements().next().unwrap().qname(), b.qname());
    }

    #[test]
    fn a_byte_order_mark_before_bad_markup_is_an_error_not_a_panic() {
        // Found by the xml fuzz target: slicing the source inside the BOM panicked.
        for doc in ["\u{feff}<>x", "\u{feff}<a>\u{e9}</b>", "\u{feff}<a/>"] {
            let _ = parse(doc);
        }
        assert!(parse("\u{feff}<>x").is_err());
        // Also found by it: quick-xml reads names it should not.
        for doc in [
            "<></>",
            "<a =\"1\"/>",
            "<1a/>",
            "<a xmlns:=\"u\"/>",
            "<a b\"c=\"1\"/>",
        ] {
            assert!(parse(doc).is_err(), "{doc}");
        }
    }

    #[test]
    fn counts_are_bounded() {
        let attrs: String = (0..10_000).map(|i| format!(" a{i}=\"v\"")).collect();
        let err = parse(&format!("<a{attrs}/>")).unwrap_err();
        assert!(err.message.contains("more than 64 attributes"), "{err}");
        let decls: String = (0..200)
            .map(|i| format!(" xmlns:p{i}=\"urn:{i}\""))
            .collect();
        let err = parse(&format!("<a>{}<b{decls}/></a>", "<c/>")).unwrap_err();
        assert!(err.message.contains("more than 64 attributes"), "{err}");
        let decls: String = (0..60)
            .map(|i| format!(" xmlns:p{i}=\"urn:{i}\""))
            .collect();
        let nested = format!("<a{decls}><b{decls}><c{decls}/></b></a>");
        let err = parse(&nested).unwrap_err();
        assert!(
            err.message
                .contains("more than 128 namespace declarations in scope at <c>"),
            "{err}"
        );
        let many = format!("<a>{}</a>", "<b/>".repeat(60_000));
        let err = parse(&many).unwrap_err();
        assert!(err.message.contains("more than 50000 elements"), "{err}");
        assert!(parse_with(&many, &Limits::response()).is_ok());
        let long = format!("<a>{}&amp;{}</a>", "x".repeat(300_000), "y".repeat(300_000));
        let err = parse(&long).unwrap_err();
        assert!(
            err.message.contains("text of more than 524288 bytes"),
            "{err}"
        );
        let cdata = format!("<a><![CDATA[{}]]></a>", "x".repeat(600_000));
        assert!(parse(&cdata).is_err());
        // At the limits, all is well.
        let attrs: String = (0..64).map(|i| format!(" a{i}=\"v\"")).collect();
        assert_eq!(parse(&format!("<a{attrs}/>")).unwrap().attrs.len(), 64);
    }

    #[test]
    fn serializes_with_stable_prefixes_and_round_trips() {
        let el = Element::new(crate::ns::GCA, "Job")
            .with_text_child(crate::ns::GCA, "GID", "job <1> & \"x\"")
            .with_attr(crate::ns::XSI, "nil", "true");
        let xml = el.to_xml();
        assert!(xml.starts_with("<gca:Job "), "{xml}");
        assert!(xml.contains(" xmlns:gca=\"urn:gca:v1\""), "{xml}");
        let back = parse(&xml).unwrap();
        assert_eq!(
            back.req_text(crate::ns::GCA, "GID").unwrap(),
            "job <1> & \"x\""
        );
        assert_eq!(back.attr(crate::ns::XSI, "nil"), Some("true"));
    }
}
