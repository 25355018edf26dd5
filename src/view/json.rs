//! The JSON document that views are evaluated over: one flat tape per resource, borrowing the
//! input line.
//!
//! Building a `serde_json::Value` tree was most of the cost of flattening: in a `convert` profile
//! of synthea ×10 with the default views, ≈70% of the time went to the tree (a heap `String` per
//! key and string, a `BTreeMap` per object, then as many frees) and only a few percent to the
//! views themselves. A [`JsonDoc`] is instead a `Vec` of fixed-size nodes in document order
//! (a container records where its subtree ends), whose strings, keys and numbers are spans of the
//! input text; only strings with escapes are decoded, into one side buffer. The node and scratch
//! buffers are reused from line to line ([`JsonBuffers`]), so parsing a resource allocates
//! nothing once the buffers have grown.
//!
//! Numbers keep their lexical form (`1.50` stays `1.50`), which the FHIRPath decimal semantics and
//! the decimal columns rely on. Objects keep their keys in input order and are searched linearly:
//! FHIR objects are small, so that is faster than hashing. The parser is strict RFC 8259 (the
//! input must already be valid UTF-8, which the decoder checks anyway for the raw column): no
//! trailing commas, comments, leading zeros or raw control characters in strings; nesting is
//! limited to [`MAX_DEPTH`], far beyond real FHIR, so that a hostile line cannot exhaust the
//! stack. On duplicate keys the
//! first one wins.

use std::borrow::{Borrow, Cow};
use std::fmt;

/// [`MAX_DEPTH`] as a literal, for the error message.
macro_rules! max_depth {
    () => {
        512
    };
}

/// Deepest nesting accepted (512 containers, the root included).
///
/// FHIR nests two JSON levels per level of extensions or questionnaire items, so this is 255
/// nested extensions: valid resources seen in practice stay far below (the deepest of the input
/// hunt, 64 nested extensions and a questionnaire 70 items deep, are ~140 levels, which the
/// former limit of 128, serde_json's, rejected). The limit exists for the stack: the parser,
/// [`to_json_text`] and FHIRPath equality of nodes recurse once per level. Measured on a debug
/// build (larger frames than release), they overflow a 2 MiB thread stack (a decode thread's)
/// at ~1,500 levels, ~1.4 KiB per level, so 512 levels use about a third of it; the test
/// `deep_resources_decode_up_to_the_nesting_limit` decodes resources at the limit on such a
/// thread.
pub const MAX_DEPTH: usize = max_depth!();
/// The parse error of a document nested deeper than [`MAX_DEPTH`].
const DEPTH_ERROR: &str = concat!("nesting deeper than ", max_depth!(), " levels");
/// Largest node buffer kept from one document to the next (256 Ki nodes, 5 MiB).
pub const MAX_KEPT_NODES: usize = 1 << 18;
/// Largest decoded-string buffer kept from one document to the next (1 MiB).
pub const MAX_KEPT_SCRATCH: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tag {
    Null,
    False,
    True,
    Number,
    /// A string without escapes: a span of the source.
    Str,
    /// A string with escapes, decoded into the scratch buffer.
    StrScratch,
    Array,
    Object,
}

/// One node of the tape. For scalars `a`/`b` are the value's start and length (in the source or
/// the scratch buffer); for containers `a` is the index one past the subtree and `b` the number
/// of children. `key_*` is the member name when the node is an object member.
#[derive(Clone, Copy, Debug)]
struct Node {
    tag: Tag,
    key_in_scratch: bool,
    key_start: u32,
    key_len: u32,
    a: u32,
    b: u32,
}

/// Reusable node and scratch buffers, so that parsing line after line does not allocate.
#[derive(Debug, Default)]
pub struct JsonBuffers {
    nodes: Vec<Node>,
    scratch: String,
}

/// A parsed JSON document borrowing its source text.
#[derive(Debug)]
pub struct JsonDoc<'s> {
    src: &'s str,
    nodes: Vec<Node>,
    scratch: String,
}

/// A node of a [`JsonDoc`]: a copyable handle.
#[derive(Clone, Copy)]
pub struct Json<'a> {
    doc: &'a JsonDoc<'a>,
    idx: u32,
}

/// A borrowed view of one JSON node, one variant per JSON kind.
#[derive(Clone, Copy, Debug)]
pub enum JsonRef<'a> {
    /// `null`.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// A number; [`number_text`] gives its lexical form.
    Number(Json<'a>),
    /// A string (escapes decoded).
    String(&'a str),
    /// An array.
    Array(JsonArray<'a>),
    /// An object.
    Object(JsonObject<'a>),
}

/// An array node.
#[derive(Clone, Copy, Debug)]
pub struct JsonArray<'a>(Json<'a>);

/// An object node.
#[derive(Clone, Copy, Debug)]
pub struct JsonObject<'a>(Json<'a>);

/// Why a line is not valid JSON, with the byte column (1-based) where parsing stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonError {
    /// What was expected or found.
    pub message: &'static str,
    /// 1-based byte column in the line.
    pub column: usize,
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at column {}", self.message, self.column)
    }
}

impl std::error::Error for JsonError {}

impl JsonError {
    /// The document is valid JSON as far as read, but nested deeper than [`MAX_DEPTH`].
    pub fn is_too_deep(&self) -> bool {
        self.message == DEPTH_ERROR
    }
}

impl<'s> JsonDoc<'s> {
    /// Parse `src` (one JSON value, surrounding whitespace allowed) using `buffers`' storage.
    /// Give the storage back with [`JsonDoc::into_buffers`] to reuse it.
    pub fn parse_with(src: &'s str, buffers: JsonBuffers) -> Result<JsonDoc<'s>, JsonError> {
        let JsonBuffers {
            mut nodes,
            mut scratch,
        } = buffers;
        nodes.clear();
        scratch.clear();
        let mut p = Parser {
            src: src.as_bytes(),
            pos: 0,
            nodes,
            scratch,
            error: "",
        };
        let r = p.document();
        let column = p.pos + 1;
        let doc = JsonDoc {
            src,
            nodes: p.nodes,
            scratch: p.scratch,
        };
        match r {
            Ok(()) => Ok(doc),
            Err(Fail) => Err(JsonError {
                message: p.error,
                column,
            }),
        }
    }

    /// Parse `src` with fresh buffers.
    pub fn parse(src: &'s str) -> Result<JsonDoc<'s>, JsonError> {
        Self::parse_with(src, JsonBuffers::default())
    }

    /// The root value.
    pub fn root(&self) -> Json<'_> {
        Json { doc: self, idx: 0 }
    }

    /// The node and scratch buffers, for the next document. Buffers grown past
    /// [`MAX_KEPT_NODES`] nodes or [`MAX_KEPT_SCRATCH`] bytes by one huge document are freed
    /// instead, so that a single long line does not hold its memory for the rest of a run.
    pub fn into_buffers(self) -> JsonBuffers {
        JsonBuffers {
            nodes: if self.nodes.capacity() <= MAX_KEPT_NODES {
                self.nodes
            } else {
                Vec::new()
            },
            scratch: if self.scratch.capacity() <= MAX_KEPT_SCRATCH {
                self.scratch
            } else {
                String::new()
            },
        }
    }

    fn text(&self, in_scratch: bool, start: u32, len: u32) -> &str {
        let (s, e) = (start as usize, start as usize + len as usize);
        let t = if in_scratch {
            self.scratch.get(s..e)
        } else {
            self.src.get(s..e)
        };
        t.unwrap_or_default()
    }
}

impl<'a> Json<'a> {
    fn node(&self) -> &'a Node {
        &self.doc.nodes[self.idx as usize]
    }

    /// The kind of this node, borrowed.
    #[inline(always)]
    pub fn kind(&self) -> JsonRef<'a> {
        let n = self.node();
        match n.tag {
            Tag::Null => JsonRef::Null,
            Tag::False => JsonRef::Bool(false),
            Tag::True => JsonRef::Bool(true),
            Tag::Number => JsonRef::Number(*self),
            Tag::Str => JsonRef::String(self.doc.text(false, n.a, n.b)),
            Tag::StrScratch => JsonRef::String(self.doc.text(true, n.a, n.b)),
            Tag::Array => JsonRef::Array(JsonArray(*self)),
            Tag::Object => JsonRef::Object(JsonObject(*self)),
        }
    }

    /// The string value, when this is a string.
    pub fn as_str(&self) -> Option<&'a str> {
        match self.kind() {
            JsonRef::String(s) => Some(s),
            _ => None,
        }
    }

    /// `true` for `null`.
    pub fn is_null(&self) -> bool {
        self.node().tag == Tag::Null
    }

    /// The member `key` when this is an object.
    pub fn get(&self, key: &str) -> Option<Json<'a>> {
        match self.kind() {
            JsonRef::Object(o) => o.get(key),
            _ => None,
        }
    }

    /// The number of nodes in this node's whole document: the size that limits how much work
    /// one evaluation over it may do.
    pub(crate) fn document_nodes(&self) -> usize {
        self.doc.nodes.len()
    }

    /// A value identifying this node within its document (for "seen" sets).
    pub fn identity(&self) -> (usize, u32) {
        (std::ptr::from_ref(self.doc) as usize, self.idx)
    }

    fn key(&self) -> &'a str {
        let n = self.node();
        self.doc.text(n.key_in_scratch, n.key_start, n.key_len)
    }

    /// Index of the node after this one's subtree.
    fn next_sibling(&self) -> u32 {
        let n = self.node();
        match n.tag {
            Tag::Array | Tag::Object => n.a,
            _ => self.idx + 1,
        }
    }

    fn children(&self) -> Children<'a> {
        let n = self.node();
        Children {
            doc: self.doc,
            next: self.idx + 1,
            left: n.b,
        }
    }
}

impl fmt::Debug for Json<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&to_json_text(self))
    }
}

impl fmt::Display for Json<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&to_json_text(self))
    }
}

/// The children of a container node, in order.
#[derive(Clone)]
pub struct Children<'a> {
    doc: &'a JsonDoc<'a>,
    next: u32,
    left: u32,
}

impl<'a> Iterator for Children<'a> {
    type Item = Json<'a>;
    #[inline]
    fn next(&mut self) -> Option<Json<'a>> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let j = Json {
            doc: self.doc,
            idx: self.next,
        };
        self.next = j.next_sibling();
        Some(j)
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left as usize, Some(self.left as usize))
    }
}

impl<'a> JsonArray<'a> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.0.node().b as usize
    }
    /// `true` when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The elements.
    pub fn iter(&self) -> Children<'a> {
        self.0.children()
    }
}

impl<'a> JsonObject<'a> {
    /// Number of members.
    pub fn len(&self) -> usize {
        self.0.node().b as usize
    }
    /// `true` when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The member `key` (the first one, if the key is repeated).
    #[inline]
    pub fn get(&self, key: impl AsRef<str>) -> Option<Json<'a>> {
        self.scan::<true>(key.as_ref().as_bytes(), |_, _| {})
    }
    /// The member `key` and, on the way, the members named `key` followed by an upper-case
    /// letter (FHIR choice elements: `valueQuantity` for `value`), each passed to `choice` with
    /// the rest of its name. With `STOP` the scan ends at the member `key`; otherwise it goes on
    /// and the first member `key` is returned at the end. One pass that fetches a key's bytes
    /// only when its length can match: the path of every member step of every view.
    #[inline]
    pub fn scan<const STOP: bool>(
        &self,
        key: &[u8],
        mut choice: impl FnMut(&'a [u8], Json<'a>),
    ) -> Option<Json<'a>> {
        let doc = self.0.doc;
        let (src, scratch) = (doc.src.as_bytes(), doc.scratch.as_bytes());
        let mut idx = self.0.idx + 1;
        let mut exact = None;
        for _ in 0..self.0.node().b {
            let Some(n) = doc.nodes.get(idx as usize) else {
                break;
            };
            let len = n.key_len as usize;
            if len >= key.len() {
                let text = if n.key_in_scratch { scratch } else { src };
                let start = n.key_start as usize;
                if let Some(k) = text.get(start..start + len)
                    && (key.is_empty() || k.first() == key.first())
                {
                    if len == key.len() {
                        if exact.is_none() && bytes_eq(k, key) {
                            exact = Some(Json { doc, idx });
                            if STOP {
                                return exact;
                            }
                        }
                    } else if k[key.len()].is_ascii_uppercase() && bytes_eq(&k[..key.len()], key) {
                        choice(&k[key.len()..], Json { doc, idx });
                    }
                }
            }
            idx = match n.tag {
                Tag::Array | Tag::Object => n.a,
                _ => idx + 1,
            };
        }
        exact
    }
    /// The members in input order with their keys as bytes: cheaper than [`JsonObject::iter`]
    /// for scans that compare keys (no UTF-8 boundary checks).
    pub fn raw_members(&self) -> RawMembers<'a> {
        RawMembers(self.0.children())
    }
    /// The members in input order.
    pub fn iter(&self) -> Members<'a> {
        Members(self.0.children())
    }
}

/// The members of an object: `(key, value)` in input order.
#[derive(Clone)]
pub struct Members<'a>(Children<'a>);

impl<'a> Iterator for Members<'a> {
    type Item = (&'a str, Json<'a>);
    #[inline]
    fn next(&mut self) -> Option<(&'a str, Json<'a>)> {
        self.0.next().map(|c| (c.key(), c))
    }
}

/// The members of an object with keys as bytes; see [`JsonObject::raw_members`].
#[derive(Clone)]
pub struct RawMembers<'a>(Children<'a>);

impl<'a> Iterator for RawMembers<'a> {
    type Item = (&'a [u8], Json<'a>);
    #[inline]
    fn next(&mut self) -> Option<(&'a [u8], Json<'a>)> {
        let c = self.0.next()?;
        let n = c.node();
        let text = if n.key_in_scratch {
            c.doc.scratch.as_bytes()
        } else {
            c.doc.src.as_bytes()
        };
        let start = n.key_start as usize;
        let key = text
            .get(start..start + n.key_len as usize)
            .unwrap_or_default();
        Some((key, c))
    }
}

impl<'a> IntoIterator for JsonObject<'a> {
    type Item = (&'a str, Json<'a>);
    type IntoIter = Members<'a>;
    fn into_iter(self) -> Members<'a> {
        self.iter()
    }
}

/// A leaked document for tests: `Json<'static>` of `text`.
#[cfg(test)]
pub(crate) fn leak_json(text: &str) -> Result<Json<'static>, JsonError> {
    let src: &'static str = Box::leak(text.to_string().into_boxed_str());
    let doc: &'static JsonDoc<'static> = Box::leak(Box::new(JsonDoc::parse(src)?));
    Ok(doc.root())
}

/// `serde_json::json!` as a leaked [`Json`] document (tests).
#[cfg(test)]
macro_rules! json_doc {
    ($($t:tt)+) => {
        $crate::view::json::leak_json(&serde_json::json!($($t)+).to_string()).expect("valid JSON")
    };
}
#[cfg(test)]
pub(crate) use json_doc;

/// `a == b` for short byte strings (member names), inline: a `memcmp` call costs more than
/// comparing a dozen bytes in place.
#[inline]
pub(crate) fn bytes_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (mut a, mut b) = (a, b);
    while let (Some((x, ra)), Some((y, rb))) =
        (a.split_first_chunk::<8>(), b.split_first_chunk::<8>())
    {
        if x != y {
            return false;
        }
        (a, b) = (ra, rb);
    }
    a.iter().zip(b).all(|(x, y)| x == y)
}

/// The kind of `v`, borrowed.
#[inline(always)]
pub fn json_ref<'a>(v: impl Borrow<Json<'a>>) -> JsonRef<'a> {
    v.borrow().kind()
}

/// The lexical text of a number node as it appeared in the input (`1.50`, `1e3`); the JSON text
/// for other nodes.
pub fn number_text<'a>(v: impl Borrow<Json<'a>>) -> Cow<'a, str> {
    let v = v.borrow();
    let n = v.node();
    match n.tag {
        Tag::Number => Cow::Borrowed(v.doc.text(false, n.a, n.b)),
        _ => Cow::Owned(to_json_text(v)),
    }
}

/// The member `key` of an object node (`None` for other nodes).
#[inline]
pub fn member<'a>(v: impl Borrow<Json<'a>>, key: &str) -> Option<Json<'a>> {
    v.borrow().get(key)
}

/// The string member `key` of an object node.
#[inline]
pub fn member_str<'a>(v: impl Borrow<Json<'a>>, key: &str) -> Option<&'a str> {
    member(v, key).and_then(|m| m.as_str())
}

/// Compact JSON text of a node: numbers in their lexical form, keys in input order.
pub fn to_json_text<'a>(v: impl Borrow<Json<'a>>) -> String {
    let mut out = String::new();
    write_json(v.borrow(), &mut out);
    out
}

fn write_str(s: &str, out: &mut String) {
    // serde_json's string escaping; writing a &str cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_default());
}

fn write_json(v: &Json<'_>, out: &mut String) {
    match v.kind() {
        JsonRef::Null => out.push_str("null"),
        JsonRef::Bool(b) => out.push_str(if b { "true" } else { "false" }),
        JsonRef::Number(n) => out.push_str(&number_text(n)),
        JsonRef::String(s) => write_str(s, out),
        JsonRef::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json(&x, out);
            }
            out.push(']');
        }
        JsonRef::Object(o) => {
            out.push('{');
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_str(k, out);
                out.push(':');
                write_json(&x, out);
            }
            out.push('}');
        }
    }
}

struct Parser<'s> {
    src: &'s [u8],
    pos: usize,
    nodes: Vec<Node>,
    scratch: String,
    /// Why parsing failed, once it has; the column is `pos + 1`, as nothing moves `pos` while
    /// an error propagates.
    error: &'static str,
}

/// A parse failure, whose message is in [`Parser::error`]: a zero-sized error keeps the
/// parser's results in registers (a [`JsonError`] made each of them a 24-byte out-parameter).
struct Fail;

type PResult<T> = Result<T, Fail>;

/// Where a parsed string ended up.
#[derive(Clone, Copy)]
struct StrSpan {
    in_scratch: bool,
    start: u32,
    len: u32,
}

/// The key of a node that is not an object member.
const NO_KEY: StrSpan = StrSpan {
    in_scratch: false,
    start: 0,
    len: 0,
};

/// JSON whitespace.
#[inline(always)]
fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\n' | b'\r' | b'\t')
}

impl Parser<'_> {
    #[cold]
    #[inline(never)]
    fn err<T>(&mut self, message: &'static str) -> PResult<T> {
        self.error = message;
        Err(Fail)
    }

    /// The byte at `pos`.
    #[inline(always)]
    fn peek(&self) -> Option<u8> {
        self.src.get(self.pos).copied()
    }

    #[inline]
    fn skip_ws(&mut self) {
        while self.peek().is_some_and(is_ws) {
            self.pos += 1;
        }
    }

    /// The byte at `pos` after any whitespace: one test in the usual compact form of ndjson.
    #[inline(always)]
    fn peek_after_ws(&mut self) -> Option<u8> {
        match self.peek() {
            Some(b) if is_ws(b) => {
                self.skip_ws();
                self.peek()
            }
            b => b,
        }
    }

    fn document(&mut self) -> PResult<()> {
        if self.src.len() > u32::MAX as usize / 2 {
            return self.err("document larger than 2 GiB");
        }
        self.value(NO_KEY, 0)?;
        self.skip_ws();
        if self.pos < self.src.len() {
            return self.err("trailing characters after the JSON value");
        }
        Ok(())
    }

    /// The value at `pos` (after any whitespace), as the member `key` of its container.
    fn value(&mut self, key: StrSpan, depth: usize) -> PResult<()> {
        let (tag, a, b) = match self.peek_after_ws() {
            Some(b'"') => {
                let s = self.string()?;
                let tag = if s.in_scratch {
                    Tag::StrScratch
                } else {
                    Tag::Str
                };
                (tag, s.start, s.len)
            }
            Some(b'{') => return self.container::<true>(key, depth),
            Some(b'[') => return self.container::<false>(key, depth),
            Some(b'-' | b'0'..=b'9') => {
                let start = self.pos;
                self.number()?;
                (Tag::Number, start as u32, (self.pos - start) as u32)
            }
            Some(b't') => {
                self.literal(b"true")?;
                (Tag::True, 0, 0)
            }
            Some(b'f') => {
                self.literal(b"false")?;
                (Tag::False, 0, 0)
            }
            Some(b'n') => {
                self.literal(b"null")?;
                (Tag::Null, 0, 0)
            }
            Some(_) => return self.err("expected a value"),
            None => return self.err("unexpected end of input, expected a value"),
        };
        self.nodes.push(Node {
            tag,
            key_in_scratch: key.in_scratch,
            key_start: key.start,
            key_len: key.len,
            a,
            b,
        });
        Ok(())
    }

    /// The object (`OBJECT`) or array at `pos`.
    fn container<const OBJECT: bool>(&mut self, key: StrSpan, depth: usize) -> PResult<()> {
        if depth >= MAX_DEPTH {
            return self.err(DEPTH_ERROR);
        }
        let close = if OBJECT { b'}' } else { b']' };
        let me = self.nodes.len();
        self.nodes.push(Node {
            tag: if OBJECT { Tag::Object } else { Tag::Array },
            key_in_scratch: key.in_scratch,
            key_start: key.start,
            key_len: key.len,
            a: 0,
            b: 0,
        });
        self.pos += 1;
        let mut count: u32 = 0;
        if self.peek_after_ws() == Some(close) {
            self.pos += 1;
        } else {
            loop {
                if OBJECT {
                    if self.peek_after_ws() != Some(b'"') {
                        return self.err("expected a member name (a string)");
                    }
                    let k = self.string()?;
                    if self.peek_after_ws() != Some(b':') {
                        return self.err("expected ':' after the member name");
                    }
                    self.pos += 1;
                    self.value(k, depth + 1)?;
                } else {
                    self.value(NO_KEY, depth + 1)?;
                }
                count += 1;
                match self.peek_after_ws() {
                    Some(b',') => self.pos += 1,
                    Some(c) if c == close => {
                        self.pos += 1;
                        break;
                    }
                    _ if OBJECT => return self.err("expected ',' or '}' in the object"),
                    _ => return self.err("expected ',' or ']' in the array"),
                }
            }
        }
        let end = self.nodes.len() as u32;
        let n = &mut self.nodes[me];
        n.a = end;
        n.b = count;
        Ok(())
    }

    fn literal(&mut self, word: &'static [u8]) -> PResult<()> {
        if self.src[self.pos..].starts_with(word) {
            self.pos += word.len();
            Ok(())
        } else {
            self.err("invalid literal (expected true, false or null)")
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.pos += 1;
        }
        self.pos - start
    }

    fn number(&mut self) -> PResult<()> {
        if self.src[self.pos] == b'-' {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => {
                self.pos += 1;
                if self.peek().is_some_and(|b| b.is_ascii_digit()) {
                    return self.err("invalid number (leading zero)");
                }
            }
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return self.err("invalid number"),
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if self.digits() == 0 {
                return self.err("invalid number (no digits after '.')");
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.pos += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return self.err("invalid number (no digits in the exponent)");
            }
        }
        Ok(())
    }

    /// A string starting at the opening quote; returns where its (decoded) text is. Inline:
    /// the common string, without escapes, is one [`find_special`] step or two.
    #[inline(always)]
    fn string(&mut self) -> PResult<StrSpan> {
        let start = self.pos + 1;
        let rest = self.src.get(start..).unwrap_or_default();
        match find_special(rest) {
            Some(i) if rest.get(i) == Some(&b'"') => {
                self.pos = start + i + 1;
                Ok(StrSpan {
                    in_scratch: false,
                    start: start as u32,
                    len: i as u32,
                })
            }
            found => self.unusual_string(start, found),
        }
    }

    /// The rest of [`Parser::string`] when the first special byte of the string, at
    /// `start + found`, is not its closing quote.
    #[cold]
    #[inline(never)]
    fn unusual_string(&mut self, start: usize, found: Option<usize>) -> PResult<StrSpan> {
        let Some(i) = found else {
            self.pos = self.src.len();
            return self.err("unterminated string");
        };
        if self.src[start + i] == b'\\' {
            self.escaped_string(start)
        } else {
            self.pos = start + i;
            self.err("control character in a string")
        }
    }

    /// The slow path: a string with escapes, decoded into the scratch buffer.
    fn escaped_string(&mut self, start: usize) -> PResult<StrSpan> {
        let out_start = self.scratch.len();
        let mut run = start;
        self.pos = start;
        loop {
            let rest = &self.src[self.pos..];
            let Some(i) = find_special(rest) else {
                self.pos = self.src.len();
                return self.err("unterminated string");
            };
            self.pos += i;
            if rest[i] < 0x20 {
                return self.err("control character in a string");
            }
            // The source is valid UTF-8 and `run..pos` ends before an ASCII quote/backslash,
            // so this slice is on character boundaries.
            self.push_src(run, self.pos)?;
            if self.src[self.pos] == b'"' {
                self.pos += 1;
                break;
            }
            self.pos += 1; // the backslash
            let Some(&e) = self.src.get(self.pos) else {
                return self.err("unterminated string");
            };
            self.pos += 1;
            let c = match e {
                b'"' => '"',
                b'\\' => '\\',
                b'/' => '/',
                b'b' => '\u{8}',
                b'f' => '\u{c}',
                b'n' => '\n',
                b'r' => '\r',
                b't' => '\t',
                b'u' => self.unicode_escape()?,
                _ => {
                    self.pos -= 1;
                    return self.err("invalid escape in a string");
                }
            };
            self.scratch.push(c);
            run = self.pos;
        }
        Ok(StrSpan {
            in_scratch: true,
            start: out_start as u32,
            len: (self.scratch.len() - out_start) as u32,
        })
    }

    fn push_src(&mut self, from: usize, to: usize) -> PResult<()> {
        match std::str::from_utf8(&self.src[from..to]) {
            Ok(s) => {
                self.scratch.push_str(s);
                Ok(())
            }
            Err(_) => self.err("invalid UTF-8 in a string"),
        }
    }

    fn hex4(&mut self) -> PResult<u32> {
        let Some(h) = self.src.get(self.pos..self.pos + 4) else {
            return self.err("truncated \\u escape");
        };
        let mut v = 0u32;
        for &b in h {
            let d = match b {
                b'0'..=b'9' => b - b'0',
                b'a'..=b'f' => b - b'a' + 10,
                b'A'..=b'F' => b - b'A' + 10,
                _ => return self.err("invalid \\u escape"),
            };
            v = v * 16 + u32::from(d);
        }
        self.pos += 4;
        Ok(v)
    }

    fn unicode_escape(&mut self) -> PResult<char> {
        let hi = self.hex4()?;
        let code = if (0xD800..0xDC00).contains(&hi) {
            if self.src.get(self.pos..self.pos + 2) != Some(b"\\u") {
                return self.err("unpaired surrogate in a \\u escape");
            }
            self.pos += 2;
            let lo = self.hex4()?;
            if !(0xDC00..0xE000).contains(&lo) {
                return self.err("unpaired surrogate in a \\u escape");
            }
            0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
        } else if (0xDC00..0xE000).contains(&hi) {
            return self.err("unpaired surrogate in a \\u escape");
        } else {
            hi
        };
        match char::from_u32(code) {
            Some(c) => Ok(c),
            None => self.err("invalid \\u escape"),
        }
    }
}

/// The index of the first byte of `b` that ends the plain part of a string: `"`, `\\` or a
/// control character (< 0x20).
///
/// On x86_64 sixteen bytes per step, in plain Rust that LLVM turns into SSE2 compares (SSE2 is
/// always there): the intrinsics themselves would need `unsafe` here, as a safe
/// `#[target_feature]` function is safe to call only from one with the same attribute, even
/// when the feature is on for the whole build. Without `pmovmskb` (which LLVM does not make of
/// this code) a step moves the flags to two general registers, so it costs about as much as
/// two SWAR steps; it pays because a string's closing quote comes in the first step more
/// often (synthea ×100: strings average 14 bytes, ~10 instructions fewer per string).
/// Elsewhere, and for the last 0..15 bytes, [`find_special_swar`].
#[inline(always)]
fn find_special(b: &[u8]) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    {
        let (chunks, rest) = b.as_chunks::<16>();
        for (k, c) in chunks.iter().enumerate() {
            let mut f = [0u8; 16];
            for (f, &x) in f.iter_mut().zip(c) {
                // 0xFF for a special byte; `min` rather than `<` becomes `pminub`/`pcmpeqb`
                // (SSE2 has no unsigned byte compare).
                *f = 0u8.wrapping_sub(u8::from((x == b'"') | (x == b'\\') | (x.min(0x1f) == x)));
            }
            let w = u128::from_le_bytes(f);
            if w != 0 {
                return Some(k * 16 + (w.trailing_zeros() / 8) as usize);
            }
        }
        find_special_swar(rest).map(|i| chunks.len() * 16 + i)
    }
    #[cfg(not(target_arch = "x86_64"))]
    find_special_swar(b)
}

/// [`find_special`] eight bytes per step (SWAR): JSON strings are mostly short, and one pass
/// that checks all three beats a `memchr2` call plus a separate control-character scan.
#[inline(always)]
fn find_special_swar(b: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    // `(v - ONES) & !v & HIGH` flags the zero bytes of `v`, the lowest one exactly (borrows
    // can only flag bytes above a true zero): so the lowest flag of the three tests is the
    // first special byte. Likewise `(x - 0x20…) & !x` for bytes below 0x20.
    let (q, bs, ctl) = (ONES * u64::from(b'"'), ONES * u64::from(b'\\'), ONES * 0x20);
    let (chunks, rest) = b.as_chunks::<8>();
    for (k, c) in chunks.iter().enumerate() {
        let x = u64::from_le_bytes(*c);
        let (xq, xb) = (x ^ q, x ^ bs);
        let m = ((xq.wrapping_sub(ONES) & !xq)
            | (xb.wrapping_sub(ONES) & !xb)
            | (x.wrapping_sub(ctl) & !x))
            & HIGH;
        if m != 0 {
            return Some(k * 8 + (m.trailing_zeros() / 8) as usize);
        }
    }
    rest.iter()
        .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
        .map(|i| chunks.len() * 8 + i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<String, JsonError> {
        JsonDoc::parse(s).map(|d| to_json_text(d.root()))
    }

    proptest::proptest! {
        #[test]
        fn find_special_finds_the_first_quote_backslash_or_control(
            b in proptest::collection::vec(
                proptest::prop_oneof![
                    8 => 0x20u8..0x7f,
                    1 => 0x80u8..=0xff,
                    1 => proptest::sample::select(vec![b'"', b'\\', 0, 0x1f, 0x0a]),
                ],
                0..100,
            ),
        ) {
            let want = b.iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20);
            proptest::prop_assert_eq!(find_special(&b), want);
        }
    }

    /// The plain definition [`find_special`] must agree with.
    fn find_special_reference(b: &[u8]) -> Option<usize> {
        b.iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20)
    }

    /// A small deterministic generator (xorshift64) for the differential tests.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    #[test]
    fn find_special_matches_the_scalar_reference() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        // Mostly plain text, so that the first special byte falls anywhere in 0..100,
        // around and across the 8- and 16-byte steps.
        let alphabet: &[&[u8]] = &[
            b"a",
            b"Z",
            b"0",
            b" ",
            b"/",
            b"~",
            b"\x7f",
            b"\x20",
            b"\x21",
            b"\x23",
            b"\x5b",
            b"\x5d",
            "é".as_bytes(),
            "€".as_bytes(),
            "😀".as_bytes(),
            b"\xa2",
            b"\xdc",
            b"\xff",
            b"\x80",
        ];
        let specials: &[u8] = b"\"\\\x00\x01\x09\x0a\x0d\x1f";
        for len in 0..100 {
            for _ in 0..300 {
                let mut b = Vec::with_capacity(len + 4);
                let density = 1 + rng.below(120);
                while b.len() < len {
                    if rng.below(density) == 0 {
                        b.push(specials[rng.below(specials.len())]);
                    } else {
                        b.extend_from_slice(alphabet[rng.below(alphabet.len())]);
                    }
                }
                b.truncate(len);
                let want = find_special_reference(&b);
                assert_eq!(find_special(&b), want, "{b:?}");
                assert_eq!(find_special_swar(&b), want, "{b:?}");
                // The same bytes at every offset of a longer buffer, as the parser sees them.
                for skip in 1..4.min(b.len() + 1) {
                    assert_eq!(find_special(&b[skip..]), find_special_reference(&b[skip..]));
                }
            }
        }
        // One special byte at each position of a plain run.
        for len in 0..100 {
            for at in 0..len {
                for &s in specials {
                    let mut b = vec![b'x'; len];
                    b[at] = s;
                    assert_eq!(find_special(&b), Some(at));
                    assert_eq!(find_special_swar(&b), Some(at));
                }
            }
            assert_eq!(find_special(&vec![b'x'; len]), None);
        }
    }

    /// A random JSON text (compact or with whitespace) without repeated member names, and its
    /// nesting depth.
    fn random_json(rng: &mut Rng, depth: usize, out: &mut String) {
        let ws = |rng: &mut Rng, out: &mut String| {
            if rng.below(4) == 0 {
                for _ in 0..rng.below(3) {
                    out.push([' ', '\n', '\t', '\r'][rng.below(4)]);
                }
            }
        };
        ws(rng, out);
        let pick = if depth >= 6 {
            4 + rng.below(6)
        } else {
            rng.below(10)
        };
        match pick {
            0 | 1 => {
                out.push('{');
                let n = rng.below(5);
                for i in 0..n {
                    if i > 0 {
                        out.push(',');
                    }
                    ws(rng, out);
                    out.push_str(&format!("\"k{i}"));
                    random_string_body(rng, out);
                    out.push('"');
                    ws(rng, out);
                    out.push(':');
                    random_json(rng, depth + 1, out);
                }
                ws(rng, out);
                out.push('}');
            }
            2 | 3 => {
                out.push('[');
                let n = rng.below(5);
                for i in 0..n {
                    if i > 0 {
                        out.push(',');
                    }
                    random_json(rng, depth + 1, out);
                }
                ws(rng, out);
                out.push(']');
            }
            4..=6 => {
                out.push('"');
                random_string_body(rng, out);
                out.push('"');
            }
            7 | 8 => {
                let numbers = [
                    "0",
                    "-0",
                    "1",
                    "-12",
                    "3.25",
                    "1.50",
                    "1e3",
                    "2E-7",
                    "-0.0e+1",
                    "123456789",
                    "0.000001",
                    "98765432109876543210",
                ];
                out.push_str(numbers[rng.below(numbers.len())]);
            }
            _ => out.push_str(["true", "false", "null"][rng.below(3)]),
        }
        ws(rng, out);
    }

    /// The inside of a JSON string: plain text of 0..60 bytes, escapes, non-ASCII.
    fn random_string_body(rng: &mut Rng, out: &mut String) {
        let pieces = [
            "a",
            "b",
            "Z",
            " ",
            "-",
            "/",
            ":",
            "é",
            "€",
            "😀",
            "\\\"",
            "\\\\",
            "\\/",
            "\\n",
            "\\t",
            "\\u00e9",
            "\\ud83d\\ude00",
            "\\u0000",
            "\\b",
            "\\f",
            "\\r",
            "urn:uuid:",
            "http://snomed.info/sct",
        ];
        let n = rng.below(12);
        let escapes = rng.below(3) == 0;
        for _ in 0..n {
            let p = pieces[rng.below(pieces.len())];
            if escapes || !p.starts_with('\\') {
                out.push_str(p);
            }
        }
    }

    #[test]
    fn parses_like_serde_json() {
        let mut rng = Rng(0x2545_F491_4F6C_DD1D);
        let breakers: &[&str] = &[
            "\"", "\\", ",", ":", "}", "]", "{", "[", " ", "\u{1}", "\u{1f}", "0", "-", ".", "e",
            "+", "t", "x", "\\u", "\\ud800", "\\ux", "01", "nul", "\n",
        ];
        let mut buffers = JsonBuffers::default();
        for _ in 0..4000 {
            let mut text = String::new();
            random_json(&mut rng, 0, &mut text);
            let theirs: serde_json::Value =
                serde_json::from_str(&text).expect("valid by construction");
            let doc =
                JsonDoc::parse_with(&text, buffers).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            let ours: serde_json::Value =
                serde_json::from_str(&to_json_text(doc.root())).expect("our output is JSON");
            assert_eq!(ours, theirs, "{text:?}");
            buffers = doc.into_buffers();
            // Broken copies: valid or not as serde_json says.
            for _ in 0..4 {
                let mut bad = text.clone();
                for _ in 0..1 + rng.below(2) {
                    let mut at = rng.below(bad.len() + 1);
                    while !bad.is_char_boundary(at) {
                        at -= 1;
                    }
                    match rng.below(3) {
                        0 => bad.truncate(at),
                        1 => bad.insert_str(at, breakers[rng.below(breakers.len())]),
                        _ => {
                            if at < bad.len() {
                                bad.remove(at);
                            }
                        }
                    }
                }
                let theirs = serde_json::from_str::<serde_json::Value>(&bad).is_ok();
                match JsonDoc::parse_with(&bad, JsonBuffers::default()) {
                    Ok(_) => assert!(theirs, "we accept {bad:?}"),
                    Err(e) => {
                        assert!(!theirs, "we reject {bad:?}: {e}");
                        assert!(e.column >= 1 && e.column <= bad.len() + 1, "{bad:?}: {e}");
                    }
                }
            }
        }
    }

    #[test]
    fn round_trips_and_keeps_lexical_numbers() {
        let src = r#" {"a":1.50,"b":[1e3,-0.0,12345678901234567890123,true,false,null],"c":"x","d":{},"e":[]} "#;
        assert_eq!(parse(src).unwrap(), src.trim());
        let doc = JsonDoc::parse(src).unwrap();
        let root = doc.root();
        assert_eq!(number_text(member(root, "a").unwrap()), "1.50");
        let JsonRef::Array(b) = json_ref(member(root, "b").unwrap()) else {
            panic!("array")
        };
        assert_eq!(b.len(), 6);
        assert_eq!(
            number_text(b.iter().nth(2).unwrap()),
            "12345678901234567890123"
        );
        assert_eq!(member_str(root, "c"), Some("x"));
        assert!(member(root, "zz").is_none());
        let empty_key = JsonDoc::parse(r#"{"x":1,"":2}"#).unwrap();
        assert_eq!(number_text(member(empty_key.root(), "").unwrap()), "2");
        let JsonRef::Object(o) = root.kind() else {
            panic!("object")
        };
        let keys: Vec<_> = o.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["a", "b", "c", "d", "e"]);
    }

    #[test]
    fn escapes_are_decoded() {
        let doc =
            JsonDoc::parse(r#"{"k\u00e9y":"a\"b\\c\/d\n\u00e9\ud83d\ude00","plain":"é"}"#).unwrap();
        let root = doc.root();
        assert_eq!(member_str(root, "kéy"), Some("a\"b\\c/d\né😀"));
        assert_eq!(member_str(root, "plain"), Some("é"));
        assert_eq!(
            to_json_text(root),
            r#"{"kéy":"a\"b\\c/d\né😀","plain":"é"}"#
        );
    }

    #[test]
    fn bytes_eq_is_slice_equality() {
        let words: Vec<Vec<u8>> = (0..40)
            .map(|n| (0..n).map(|i| b'a' + (i % 26) as u8).collect())
            .collect();
        for a in &words {
            for b in &words {
                assert_eq!(bytes_eq(a, b), a == b);
                for i in 0..b.len() {
                    let mut c = b.clone();
                    c[i] ^= 1;
                    assert_eq!(bytes_eq(a, &c), *a == c, "{a:?} {c:?}");
                }
            }
        }
    }

    #[test]
    fn buffers_are_reused() {
        let mut buf = JsonBuffers::default();
        for line in [r#"{"a":"\n"}"#, r#"{"b":[1,2]}"#] {
            let doc = JsonDoc::parse_with(line, buf).unwrap();
            assert_eq!(to_json_text(doc.root()), line);
            buf = doc.into_buffers();
        }
        assert!(buf.nodes.capacity() > 0 && buf.scratch.capacity() > 0);
        // A huge document's buffers are freed rather than kept.
        let big = format!(
            "[{}\"\\n{}\"]",
            "0,".repeat(MAX_KEPT_NODES),
            "x".repeat(MAX_KEPT_SCRATCH)
        );
        let doc = JsonDoc::parse_with(&big, buf).unwrap();
        let buf = doc.into_buffers();
        assert_eq!((buf.nodes.capacity(), buf.scratch.capacity()), (0, 0));
    }

    #[test]
    fn malformed_input_is_an_error_with_a_column() {
        for (bad, col) in [
            ("{\"a\":", 6),
            ("{\"a\":1} x", 9),
            ("[1,]", 4),
            ("{\"a\" 1}", 6),
            ("{'a':1}", 2),
            ("01", 2),
            ("1.", 3),
            ("-", 2),
            ("1e", 3),
            ("\"a\u{1}\"", 3),
            ("\"\\x\"", 3),
            ("\"\\ud800\"", 8),
            ("\"abc", 5),
            ("tru", 1),
            ("", 1),
            ("{\"a\":1,}", 8),
        ] {
            let e = parse(bad).expect_err(bad);
            assert_eq!(e.column, col, "{bad:?}: {e}");
        }
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        let e = parse(&deep).unwrap_err();
        assert_eq!(e.message, "nesting deeper than 512 levels");
        assert_eq!(e.column, MAX_DEPTH + 1);
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(parse(&ok).is_ok());
    }

    #[test]
    fn agrees_with_serde_json_on_what_is_valid() {
        for s in [
            "0",
            "-0",
            "1E+2",
            "1e-2",
            "[]",
            "{}",
            "\"\"",
            "[[[]]]",
            " true ",
            "null",
            "{\"a\":[{\"b\":null}]}",
            "1.5e",
            "+1",
            ".5",
            "[1 2]",
            "{\"a\"}",
            "\"\t\"",
            "nul",
        ] {
            let ours = parse(s).is_ok();
            let theirs = serde_json::from_str::<serde_json::Value>(s).is_ok();
            assert_eq!(ours, theirs, "{s:?}");
        }
    }
}
