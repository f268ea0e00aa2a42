//! XPath 1.0 queries on resource property documents (WS-RP `QueryResourceProperties`), with
//! bounds: a query comes from anyone who can reach the service, and the XPath engine
//! (`sxd-xpath`) has none of its own.
//!
//! - **The expression** is checked before the engine sees it ([`check_expression`]): its
//!   length, how deeply parentheses, brackets and function calls nest, and how many operators
//!   it has. The engine's parser and evaluator recurse once per nesting level and once per
//!   operator of a chain, and a stack overflow aborts the whole process (it is not a panic,
//!   `catch_unwind` does not stop it): ~10⁵ nested parentheses did that to the GCS.
//! - **The evaluation** runs on its own thread (never on an async worker), under a permit of
//!   a process-wide cap on concurrent evaluations ([`QueryLimits::max_concurrent`]), with a
//!   deadline. Every function the query calls checks the deadline first and refuses strings
//!   longer than [`QueryLimits::max_string_bytes`], so the classic runaways
//!   (`//*[count(//*[count(//*)])]`, nested `concat(string(/), …)`) stop at the deadline. A
//!   query that calls no function cannot be interrupted: the caller gets its fault at the
//!   deadline, and the thread finishes in the background while holding its permit, so
//!   runaway queries can occupy at most `max_concurrent` threads, never the service.
//! - **The result** is bounded too ([`QueryLimits::max_result_elements`]).
//!
//! Every refusal is a typed WS-RP fault that names the limit: `InvalidQueryExpressionFault`
//! for the expression, `QueryEvaluationErrorFault` for the evaluation.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use sxd_xpath::function::{self, Function};
use sxd_xpath::{context, nodeset, Context, Factory, Value};

use crate::fault::{Fault, FaultKind};
use crate::ns;
use crate::xml::{Element, Node};

/// The element that carries a query result which is not an element.
pub const QUERY_RESULT: &str = "QueryResult";

/// Longest expression accepted, in bytes.
pub const MAX_EXPRESSION_BYTES: usize = 4096;
/// Deepest nesting of parentheses, brackets and function calls accepted.
pub const MAX_NESTING: usize = 32;
/// Most operators (`+ - * | = != < <= > >= and or div mod`) accepted in one expression.
pub const MAX_OPERATORS: usize = 128;

/// Bounds on evaluating queries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryLimits {
    /// Bound on one evaluation, from the moment it is asked for.
    pub timeout: Duration,
    /// How long a query waits for an evaluation slot before it is refused.
    pub queue_timeout: Duration,
    /// Evaluations running at once in this process (runaway ones included).
    pub max_concurrent: usize,
    /// Longest string a function of the query may produce or take.
    pub max_string_bytes: usize,
    /// Most elements (counting descendants) a result may copy out of the document.
    pub max_result_elements: usize,
}

impl Default for QueryLimits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            queue_timeout: Duration::from_secs(1),
            max_concurrent: 2,
            max_string_bytes: 1024 * 1024,
            max_result_elements: 50_000,
        }
    }
}

fn invalid(expression: &str, why: impl std::fmt::Display) -> Fault {
    Fault::new(
        FaultKind::InvalidQueryExpression,
        format!("invalid XPath 1.0 expression {}: {why}", shown(expression)),
    )
}

fn failed(expression: &str, why: impl std::fmt::Display) -> Fault {
    Fault::new(
        FaultKind::QueryEvaluationError,
        format!("evaluating {} failed: {why}", shown(expression)),
    )
}

/// The expression as messages show it: quoted, and cut when long.
fn shown(expression: &str) -> String {
    const SHOWN: usize = 120;
    if expression.len() <= SHOWN {
        return format!("{expression:?}");
    }
    let mut end = SHOWN;
    while !expression.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes)", &expression[..end], expression.len())
}

/// Checks an expression against [`MAX_EXPRESSION_BYTES`], [`MAX_NESTING`] and
/// [`MAX_OPERATORS`], without parsing it (the XPath parser itself recurses); an
/// `InvalidQueryExpression` fault says which limit it exceeds.
pub fn check_expression(expression: &str) -> Result<(), Fault> {
    if expression.len() > MAX_EXPRESSION_BYTES {
        return Err(invalid(
            expression,
            format!(
                "it is {} bytes long; at most {MAX_EXPRESSION_BYTES} are accepted",
                expression.len()
            ),
        ));
    }
    let bytes = expression.as_bytes();
    let is_name = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.') || b >= 0x80;
    let (mut depth, mut operators, mut i) = (0usize, 0usize, 0usize);
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'\'' | b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b {
                    i += 1;
                }
            }
            b'(' | b'[' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Err(invalid(
                        expression,
                        format!(
                            "parentheses, brackets and function calls nest deeper than {MAX_NESTING} levels"
                        ),
                    ));
                }
            }
            b')' | b']' => depth = depth.saturating_sub(1),
            b'+' | b'-' | b'*' | b'|' | b'=' | b'<' | b'>' => operators += 1,
            b'!' if bytes.get(i + 1) == Some(&b'=') => {
                operators += 1;
                i += 1;
            }
            b if b.is_ascii_alphabetic() || b == b'_' || b >= 0x80 => {
                let start = i;
                while i + 1 < bytes.len() && is_name(bytes[i + 1]) {
                    i += 1;
                }
                if matches!(&bytes[start..=i], b"and" | b"or" | b"div" | b"mod") {
                    operators += 1;
                }
            }
            _ => {}
        }
        if operators > MAX_OPERATORS {
            return Err(invalid(
                expression,
                format!("it has more than {MAX_OPERATORS} operators"),
            ));
        }
        i += 1;
    }
    Ok(())
}

/// Checks an expression ([`check_expression`]) and parses it with the XPath engine, without
/// evaluating it: what the service does before a query is evaluated (and what the fuzz
/// target `wsrp_requests` drives, since anything the check lets through reaches the engine's
/// recursive parser).
pub fn compile(expression: &str) -> Result<(), Fault> {
    check_expression(expression)?;
    Factory::new()
        .build(expression)
        .map_err(|e| invalid(expression, e))?
        .ok_or_else(|| invalid(expression, "it is empty"))?;
    Ok(())
}

/// The process-wide cap on concurrent evaluations, sized by the first caller's limits.
fn slots(limits: &QueryLimits) -> Arc<tokio::sync::Semaphore> {
    static SLOTS: OnceLock<Arc<tokio::sync::Semaphore>> = OnceLock::new();
    SLOTS
        .get_or_init(|| Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent.max(1))))
        .clone()
}

/// Evaluates a query with [`QueryLimits::default`], off the async workers: see [`evaluate`].
pub async fn query(
    document: &Element,
    expression: &str,
    namespaces: &[(String, String)],
) -> Result<Vec<Node>, Fault> {
    evaluate(
        document,
        expression,
        namespaces,
        &QueryLimits::default(),
        &slots(&QueryLimits::default()),
    )
    .await
}

/// Evaluates an XPath 1.0 expression on an RP document, with the document node as context
/// (so `/gca:X/gca:Y` and `//gca:Y` both work), on a thread of its own holding a permit of
/// `slots`, bounded by `limits`.
///
/// Node-set results are copies of the selected elements in document order. Everything else
/// comes wrapped in a `gca:QueryResult`, because the rp-2 schema wants at least one element
/// in the response: a boolean, number or string result (`Type="boolean|number|string"`, its
/// XPath string value), each selected attribute or text node (`Type="text"`), and an empty
/// node-set (`Type="empty"`, no content).
pub async fn evaluate(
    document: &Element,
    expression: &str,
    namespaces: &[(String, String)],
    limits: &QueryLimits,
    slots: &Arc<tokio::sync::Semaphore>,
) -> Result<Vec<Node>, Fault> {
    let now = Instant::now();
    let deadline = now
        .checked_add(limits.timeout)
        .unwrap_or(now + Duration::from_secs(3600));
    check_expression(expression)?;
    let permit = match tokio::time::timeout(
        limits.queue_timeout.min(limits.timeout),
        slots.clone().acquire_owned(),
    )
    .await
    {
        Ok(Ok(p)) => p,
        Ok(Err(_)) | Err(_) => {
            return Err(failed(
                expression,
                format!(
                    "the service is busy: at most {} queries are evaluated at once and none finished within {:?}; try again",
                    limits.max_concurrent.max(1),
                    limits.queue_timeout.min(limits.timeout)
                ),
            ))
        }
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job = {
        let document = document.clone();
        let expression = expression.to_string();
        let namespaces = namespaces.to_vec();
        let limits = limits.clone();
        move || {
            let result = evaluate_here(&document, &expression, &namespaces, &limits, deadline);
            let _ = tx.send(result);
            // The slot is free once the evaluation is over, even when nobody waits any more.
            drop(permit);
        }
    };
    // The engine recurses per nesting level: a thread with a known, generous stack.
    std::thread::Builder::new()
        .name("gca-xpath".into())
        .stack_size(16 * 1024 * 1024)
        .spawn(job)
        .map_err(|e| failed(expression, format!("no thread to evaluate it on: {e}")))?;
    match tokio::time::timeout_at(deadline.into(), rx).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(failed(expression, "the XPath engine stopped unexpectedly")),
        Err(_) => Err(deadline_passed(expression, limits)),
    }
}

fn deadline_passed(expression: &str, limits: &QueryLimits) -> Fault {
    failed(
        expression,
        format!(
            "it ran longer than the limit of {:?} and was stopped",
            limits.timeout
        ),
    )
}

/// Why a function stopped an evaluation.
#[derive(Debug, Clone)]
enum Stop {
    Deadline,
    Limit(String),
}

/// What the functions of one evaluation may still spend.
struct Budget {
    deadline: Instant,
    max_string_bytes: usize,
    /// Why the evaluation was stopped, for the fault (the engine's own error says less).
    stopped: Cell<Option<Stop>>,
}

impl Budget {
    fn stop(&self, why: Stop) -> function::Error {
        let text = match &why {
            Stop::Deadline => "the deadline passed".to_string(),
            Stop::Limit(m) => m.clone(),
        };
        self.stopped.set(Some(why));
        function::Error::Other(text)
    }
}

/// A core function, called through the budget: the deadline before, the string size after.
struct Guarded {
    name: &'static str,
    core: Rc<Context<'static>>,
    budget: Rc<Budget>,
}

impl Function for Guarded {
    fn evaluate<'c, 'd>(
        &self,
        context: &context::Evaluation<'c, 'd>,
        args: Vec<Value<'d>>,
    ) -> Result<Value<'d>, function::Error> {
        if Instant::now() >= self.budget.deadline {
            return Err(self.budget.stop(Stop::Deadline));
        }
        let max = self.budget.max_string_bytes;
        let too_long = |len: usize| {
            self.budget.stop(Stop::Limit(format!(
                "{}() met a string of {len} bytes; at most {max} are allowed",
                self.name
            )))
        };
        for a in &args {
            if let Value::String(s) = a {
                if s.len() > max {
                    return Err(too_long(s.len()));
                }
            }
        }
        let core = context::Evaluation::new(&self.core, context.node)
            .function_for_name(sxd_document::QName::new(self.name))
            .ok_or_else(|| function::Error::Other(format!("no core function {}", self.name)))?;
        let value = core.evaluate(context, args)?;
        if let Value::String(s) = &value {
            if s.len() > max {
                return Err(too_long(s.len()));
            }
        }
        Ok(value)
    }
}

/// The XPath 1.0 core library, by name.
const CORE_FUNCTIONS: &[&str] = &[
    "last",
    "position",
    "count",
    "local-name",
    "namespace-uri",
    "name",
    "string",
    "concat",
    "starts-with",
    "contains",
    "substring-before",
    "substring-after",
    "substring",
    "string-length",
    "normalize-space",
    "translate",
    "boolean",
    "not",
    "true",
    "false",
    "number",
    "sum",
    "floor",
    "ceiling",
    "round",
];

/// The evaluation itself, on the calling thread (which must be one of our query threads).
fn evaluate_here(
    document: &Element,
    expression: &str,
    namespaces: &[(String, String)],
    limits: &QueryLimits,
    deadline: Instant,
) -> Result<Vec<Node>, Fault> {
    let xpath = Factory::new()
        .build(expression)
        .map_err(|e| invalid(expression, e))?
        .ok_or_else(|| invalid(expression, "it is empty"))?;
    if let Some(prefix) = qname_prefixes(expression)
        .into_iter()
        .find(|p| !namespaces.iter().any(|(q, _)| q == p))
    {
        return Err(failed(
            expression,
            format!("the prefix {prefix:?} is not bound to a namespace"),
        ));
    }
    let package = sxd_document::Package::new();
    let doc = package.as_document();
    let root = to_sxd(&doc, document);
    doc.root().append_child(root);
    let budget = Rc::new(Budget {
        deadline,
        max_string_bytes: limits.max_string_bytes,
        stopped: Cell::new(None),
    });
    let core = Rc::new(Context::new());
    let mut ctx = Context::without_core_functions();
    for name in CORE_FUNCTIONS {
        ctx.set_function(
            *name,
            Guarded {
                name,
                core: core.clone(),
                budget: budget.clone(),
            },
        );
    }
    for (p, u) in namespaces {
        ctx.set_namespace(p, u);
    }
    // sxd-xpath panics on a few conditions instead of returning errors; contain them.
    let value = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        xpath.evaluate(&ctx, doc.root())
    }))
    .map_err(|_| failed(expression, "the XPath engine could not evaluate it"))?;
    if Instant::now() >= deadline {
        return Err(deadline_passed(expression, limits));
    }
    let value = match value {
        Ok(v) => v,
        Err(e) => {
            return Err(match budget.stopped.take() {
                Some(Stop::Deadline) => deadline_passed(expression, limits),
                Some(Stop::Limit(why)) => failed(expression, why),
                None => failed(expression, e),
            })
        }
    };
    let result = |kind: &str, text: Option<String>| {
        let el = Element::new(ns::GCA, QUERY_RESULT).with_attr("", "Type", kind);
        Node::Element(match text {
            Some(t) => el.with_text(t),
            None => el,
        })
    };
    Ok(match value {
        Value::Nodeset(set) if set.size() == 0 => vec![result("empty", None)],
        Value::Nodeset(set) => {
            let mut left = limits.max_result_elements;
            let mut out = Vec::new();
            for n in set.document_order() {
                out.push(match n {
                    nodeset::Node::Element(e) => Node::Element(
                        from_sxd(e, &mut left).ok_or_else(|| too_large(expression, limits))?,
                    ),
                    nodeset::Node::Root(_) => {
                        left = left
                            .checked_sub(element_count(document))
                            .ok_or_else(|| too_large(expression, limits))?;
                        Node::Element(document.clone())
                    }
                    other => {
                        left = left
                            .checked_sub(1)
                            .ok_or_else(|| too_large(expression, limits))?;
                        result("text", Some(other.string_value()))
                    }
                });
            }
            out
        }
        Value::Boolean(b) => vec![result("boolean", Some(b.to_string()))],
        Value::Number(n) => vec![result("number", Some(xpath_number(n)))],
        Value::String(s) => vec![result("string", Some(s))],
    })
}

fn too_large(expression: &str, limits: &QueryLimits) -> Fault {
    failed(
        expression,
        format!(
            "its result holds more than {} elements; select less",
            limits.max_result_elements
        ),
    )
}

/// The prefixes of the QNames in an XPath expression (outside string literals; `axis::` is
/// not a prefix).
fn qname_prefixes(expr: &str) -> Vec<String> {
    let chars: Vec<char> = expr.chars().collect();
    let is_name = |c: char| c.is_alphanumeric() || matches!(c, '_' | '-' | '.');
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\'' || c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += 1;
            }
            i += 1;
            continue;
        }
        if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && is_name(chars[i]) {
                i += 1;
            }
            let preceded_by_var = start > 0 && chars[start - 1] == '$';
            if i + 1 < chars.len()
                && chars[i] == ':'
                && chars[i + 1] != ':'
                && (chars[i + 1].is_alphabetic() || chars[i + 1] == '_' || chars[i + 1] == '*')
                && !preceded_by_var
            {
                out.push(chars[start..i].iter().collect());
            }
            continue;
        }
        if c.is_ascii_digit() {
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                i += 1;
            }
            continue;
        }
        i += 1;
    }
    out
}

/// The XPath 1.0 string value of a number (`string()` rules: integers without `.0`).
fn xpath_number(n: f64) -> String {
    if n.is_nan() {
        "NaN".into()
    } else if n.is_infinite() {
        if n > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        format!("{n}")
    }
}

fn to_sxd<'d>(
    doc: &sxd_document::dom::Document<'d>,
    el: &Element,
) -> sxd_document::dom::Element<'d> {
    let out = doc.create_element(sxd_document::QName::with_namespace_uri(
        el.ns.as_deref(),
        &el.name,
    ));
    for a in &el.attrs {
        out.set_attribute_value(
            sxd_document::QName::with_namespace_uri(a.ns.as_deref(), &a.name),
            &a.value,
        );
    }
    for c in &el.children {
        match c {
            Node::Element(e) => out.append_child(to_sxd(doc, e)),
            Node::Text(t) => out.append_child(doc.create_text(t)),
        }
    }
    out
}

fn element_count(el: &Element) -> usize {
    1 + el.elements().map(element_count).sum::<usize>()
}

/// A copy of `el`, or None when it would take more than `left` elements (counted down).
fn from_sxd(el: sxd_document::dom::Element<'_>, left: &mut usize) -> Option<Element> {
    use sxd_document::dom::ChildOfElement;
    *left = left.checked_sub(1)?;
    let name = el.name();
    let mut out = Element::new(name.namespace_uri().unwrap_or(""), name.local_part());
    for a in el.attributes() {
        let n = a.name();
        out = out.with_attr(n.namespace_uri().unwrap_or(""), n.local_part(), a.value());
    }
    for c in el.children() {
        match c {
            ChildOfElement::Element(e) => out.push_child(from_sxd(e, left)?),
            ChildOfElement::Text(t) => out.children.push(Node::Text(t.text().to_string())),
            _ => {}
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(elements: usize) -> Element {
        let mut root = Element::new(ns::GCA, "Doc");
        for i in 0..elements {
            root.push_text_child(ns::GCA, "N", i.to_string());
        }
        root
    }

    fn gca() -> Vec<(String, String)> {
        vec![("gca".to_string(), ns::GCA.to_string())]
    }

    fn limits() -> QueryLimits {
        QueryLimits {
            timeout: Duration::from_millis(500),
            ..QueryLimits::default()
        }
    }

    async fn run(d: &Element, expr: &str, limits: &QueryLimits) -> Result<Vec<Node>, Fault> {
        let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent));
        evaluate(d, expr, &gca(), limits, &slots).await
    }

    #[tokio::test]
    async fn deeply_nested_expressions_are_refused_before_the_engine_parses_them() {
        // ~10⁵ nested parentheses overflowed the stack of sxd-xpath's parser: the process
        // aborted. Refused up front now, whatever the length limit.
        for expr in [
            format!("{}1{}", "(".repeat(100_000), ")".repeat(100_000)),
            format!(
                "{}1{}",
                "(".repeat(MAX_NESTING + 1),
                ")".repeat(MAX_NESTING + 1)
            ),
            format!("//gca:N{}", "[1".repeat(MAX_NESTING + 1)),
            format!(
                "{}1{}",
                "concat(".repeat(MAX_NESTING + 1),
                ")".repeat(MAX_NESTING + 1)
            ),
        ] {
            let f = run(&doc(1), &expr, &limits()).await.unwrap_err();
            assert_eq!(f.kind, FaultKind::InvalidQueryExpression, "{f:?}");
            assert!(
                f.message.contains("bytes long") || f.message.contains("nest deeper than 32"),
                "{}",
                f.message
            );
            assert!(
                f.message.len() < 400,
                "the fault does not echo the whole expression"
            );
        }
        // Operator chains build trees as deep as they are long; unary minus recurses too.
        for expr in [
            vec!["1"; MAX_OPERATORS + 2].join("+"),
            format!("{}1", "-".repeat(MAX_OPERATORS + 1)),
            vec!["true()"; MAX_OPERATORS + 2].join(" or "),
        ] {
            let f = run(&doc(1), &expr, &limits()).await.unwrap_err();
            assert_eq!(f.kind, FaultKind::InvalidQueryExpression);
            assert!(f.message.contains("operators"), "{}", f.message);
        }
        let f = run(&doc(1), &"a".repeat(MAX_EXPRESSION_BYTES + 1), &limits())
            .await
            .unwrap_err();
        assert!(f.message.contains("at most 4096"), "{}", f.message);
    }

    #[tokio::test]
    async fn expressions_at_the_limits_are_evaluated() {
        let d = doc(3);
        let nested = format!(
            "{}count(//gca:N){}",
            "(".repeat(MAX_NESTING - 1),
            ")".repeat(MAX_NESTING - 1)
        );
        let chain = vec!["1"; MAX_OPERATORS + 1].join("+");
        let names = "//gca:N[. = 1 or . = 2][not(. = 'and or div mod')]";
        let r = run(&d, &nested, &limits()).await.unwrap();
        assert_eq!(
            Element::new("", "x")
                .with_children(r.into_iter().filter_map(|n| match n {
                    Node::Element(e) => Some(e),
                    _ => None,
                }))
                .text(),
            "3"
        );
        let r = run(&d, &chain, &limits()).await.unwrap();
        assert!(
            matches!(&r[..], [Node::Element(e)] if e.text() == "129"),
            "{r:?}"
        );
        assert_eq!(run(&d, names, &limits()).await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn runaway_evaluations_stop_at_the_deadline() {
        // O(n³) node visits: minutes on 400 elements without the deadline.
        let d = doc(400);
        let started = Instant::now();
        let f = run(&d, "//*[count(//*[count(//*)])]", &limits())
            .await
            .unwrap_err();
        assert_eq!(f.kind, FaultKind::QueryEvaluationError);
        assert!(
            f.message.contains("ran longer than the limit of 500ms"),
            "{}",
            f.message
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn strings_are_bounded() {
        // Each level adds two copies of the document's text.
        let mut expr = "string(/)".to_string();
        for _ in 0..30 {
            expr = format!("concat({expr},string(/),string(/))");
        }
        let limits = QueryLimits {
            max_string_bytes: 64 * 1024,
            ..limits()
        };
        let f = run(&doc(2000), &expr, &limits).await.unwrap_err();
        assert_eq!(f.kind, FaultKind::QueryEvaluationError);
        assert!(
            f.message.contains("at most 65536 are allowed"),
            "{}",
            f.message
        );
        let f = run(&doc(20_000), "string-length(string(/))", &limits)
            .await
            .unwrap_err();
        assert!(
            f.message.contains("string() met a string of"),
            "{}",
            f.message
        );
    }

    #[tokio::test]
    async fn results_are_bounded() {
        let limits = QueryLimits {
            max_result_elements: 10,
            ..limits()
        };
        assert_eq!(run(&doc(9), "//gca:N", &limits).await.unwrap().len(), 9);
        let f = run(&doc(11), "//gca:N", &limits).await.unwrap_err();
        assert!(f.message.contains("more than 10 elements"), "{}", f.message);
        let f = run(&doc(10), "/", &limits).await.unwrap_err();
        assert!(f.message.contains("more than 10 elements"), "{}", f.message);
    }

    #[tokio::test]
    async fn evaluations_beyond_the_cap_are_refused_while_runaways_hold_the_slots() {
        let limits = QueryLimits {
            max_concurrent: 1,
            timeout: Duration::from_secs(2),
            queue_timeout: Duration::from_millis(100),
            ..QueryLimits::default()
        };
        let slots = Arc::new(tokio::sync::Semaphore::new(1));
        let d = doc(400);
        let runaway = {
            let (d, limits, slots) = (d.clone(), limits.clone(), slots.clone());
            tokio::spawn(async move {
                evaluate(&d, "//*[count(//*[count(//*)])]", &gca(), &limits, &slots).await
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        let f = evaluate(&d, "count(//gca:N)", &gca(), &limits, &slots)
            .await
            .unwrap_err();
        assert_eq!(f.kind, FaultKind::QueryEvaluationError);
        assert!(
            f.message
                .contains("at most 1 queries are evaluated at once"),
            "{}",
            f.message
        );
        assert!(runaway.await.unwrap().is_err());
        // The slot comes back once the runaway stopped.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r = evaluate(&d, "count(//gca:N)", &gca(), &limits, &slots)
            .await
            .unwrap();
        assert!(
            matches!(&r[..], [Node::Element(e)] if e.text() == "400"),
            "{r:?}"
        );
    }
}
