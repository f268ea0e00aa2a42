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

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use quick_xml::events::Event;
use quick_xml::name::ResolveResult;
use quick_xml::NsReader;

/// Deepest nesting accepted from the network; real messages stay far below.
pub const MAX_DEPTH: usize = 64;

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

/// Prefix → namespace URI bindings in scope at an element ("" is the default namespace).
pub type Scope = Arc<BTreeMap<String, String>>;

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
                .map(|ns| (Some(ns.clone()), local.to_string())),
            None => Some((self.scope.get("").cloned(), value.to_string())),
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

/// Parses a document and returns its root element.
///
/// DOCTYPE declarations are refused (no entity tricks), as is nesting deeper than
/// [`MAX_DEPTH`]. Comments and processing instructions are dropped; whitespace-only text
/// between elements is dropped too.
pub fn parse(src: &str) -> Result<Element, XmlError> {
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
        // The event starts after any leading whitespace that quick-xml skipped.
        let start =
            pos + src[pos.min(src.len())..].len() - src[pos.min(src.len())..].trim_start().len();
        match event {
            Event::Start(ref e) | Event::Empty(ref e) => {
                let empty = matches!(event, Event::Empty(_));
                if root.is_some() {
                    return Err(XmlError::new(
                        Some(lines.line(start)),
                        "content after the document element",
                    ));
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(XmlError::new(
                        Some(lines.line(start)),
                        format!("elements nested deeper than {MAX_DEPTH} levels"),
                    ));
                }
                let line = lines.line(start);
                let ns = match resolved {
                    ResolveResult::Bound(ns) => Some(utf8(ns.as_ref(), line)?),
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
                let name = utf8(e.local_name().as_ref(), line)?;
                let mut scope = scopes.last().cloned().unwrap_or_default();
                let mut attrs = Vec::new();
                for a in e.attributes() {
                    let a = a.map_err(|err| {
                        XmlError::new(Some(line), format!("malformed attribute: {err}"))
                    })?;
                    let key = a.key.as_ref();
                    if key == b"xmlns" || key.starts_with(b"xmlns:") {
                        let prefix = if key == b"xmlns" {
                            String::new()
                        } else {
                            utf8(&key[6..], line)?
                        };
                        let value = a.unescape_value().map_err(|err| {
                            XmlError::new(Some(line), format!("bad namespace value: {err}"))
                        })?;
                        Arc::make_mut(&mut scope).insert(prefix, value.into_owned());
                        continue;
                    }
                    let (ans, alocal) = reader.resolve_attribute(a.key);
                    let ans = match ans {
                        ResolveResult::Bound(ns) => Some(utf8(ns.as_ref(), line)?),
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
                        name: utf8(alocal.as_ref(), line)?,
                        value: value.into_owned(),
                    });
                }
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
                push_text(&mut stack, &root, text.as_ref(), || lines.line(start))?;
            }
            Event::CData(t) => {
                let text = String::from_utf8(t.into_inner().into_owned())
                    .map_err(|_| XmlError::new(Some(lines.line(start)), "CDATA is not UTF-8"))?;
                push_text(&mut stack, &root, &text, || lines.line(start))?;
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
    line: impl FnOnce() -> usize,
) -> Result<(), XmlError> {
    match stack.last_mut() {
        Some(parent) => {
            // Whitespace between elements carries no meaning in any message we read.
            if text.trim().is_empty() && parent.elements().next().is_some() {
                return Ok(());
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
