//! Precedence-climbing parser producing an AST whose functions, constants and type specifiers are
//! already resolved.

use super::lexer::{LexError, Tok, Token, tokenize};
use super::regex::Regex;
use super::types::{Constants, FhirPathError, Item, Literal, static_type_name};

/// Maximum AST depth (nesting of parentheses, function arguments, operator and invocation
/// chains). Deeper expressions fail with [`FhirPathError::TooDeep`], which keeps both the
/// recursive-descent parser and the recursive evaluator far from the stack limit even in debug
/// builds on a 2 MiB thread stack (measured: about 100 levels fit there, so 64 leaves headroom).
/// Real view expressions nest a handful of levels.
pub const MAX_DEPTH: usize = 64;

/// Binary operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BinOp {
    Mul,
    Div,
    IntDiv,
    Mod,
    Add,
    Sub,
    Concat,
    Union,
    Lt,
    Gt,
    Le,
    Ge,
    Eq,
    Ne,
    Equiv,
    NotEquiv,
    In,
    Contains,
    And,
    Or,
    Xor,
    Implies,
}

impl BinOp {
    pub(crate) fn symbol(self) -> &'static str {
        match self {
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::IntDiv => "div",
            BinOp::Mod => "mod",
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Concat => "&",
            BinOp::Union => "|",
            BinOp::Lt => "<",
            BinOp::Gt => ">",
            BinOp::Le => "<=",
            BinOp::Ge => ">=",
            BinOp::Eq => "=",
            BinOp::Ne => "!=",
            BinOp::Equiv => "~",
            BinOp::NotEquiv => "!~",
            BinOp::In => "in",
            BinOp::Contains => "contains",
            BinOp::And => "and",
            BinOp::Or => "or",
            BinOp::Xor => "xor",
            BinOp::Implies => "implies",
        }
    }
}

/// A type specifier as used by `ofType`, `is`, `as`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct TypeSpec {
    /// `FHIR`, `System` or none.
    pub(crate) namespace: Option<String>,
    /// The type name as written (without namespace).
    pub(crate) name: String,
    /// The static FHIR type name when `name` is a known FHIR data type (and the namespace is not
    /// `System`).
    pub(crate) fhir: Option<&'static str>,
    /// The FHIRPath system type when `name` is one (`System.String`, or `String` unqualified).
    pub(crate) system: Option<SystemType>,
}

/// FHIRPath system types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SystemType {
    Boolean,
    String,
    Integer,
    Decimal,
    Date,
    DateTime,
    Time,
    Quantity,
}

impl SystemType {
    fn from_name(name: &str) -> Option<SystemType> {
        Some(match name {
            "Boolean" => SystemType::Boolean,
            "String" => SystemType::String,
            "Integer" => SystemType::Integer,
            "Decimal" => SystemType::Decimal,
            "Date" => SystemType::Date,
            "DateTime" => SystemType::DateTime,
            "Time" => SystemType::Time,
            "Quantity" => SystemType::Quantity,
            _ => return None,
        })
    }

    /// The FHIR primitive name a value of this system type is reported as.
    pub(crate) fn fhir_name(self) -> &'static str {
        match self {
            SystemType::Boolean => "boolean",
            SystemType::String => "string",
            SystemType::Integer => "integer",
            SystemType::Decimal => "decimal",
            SystemType::Date => "date",
            SystemType::DateTime => "dateTime",
            SystemType::Time => "time",
            SystemType::Quantity => "Quantity",
        }
    }
}

impl TypeSpec {
    fn new(namespace: Option<String>, name: String) -> TypeSpec {
        let is_system = namespace.as_deref() == Some("System");
        let fhir = if is_system {
            None
        } else {
            static_type_name(&name)
        };
        let system = if namespace.as_deref() == Some("FHIR") {
            None
        } else {
            SystemType::from_name(&name)
        };
        TypeSpec {
            namespace,
            name,
            fhir,
            system,
        }
    }

    /// The type name reported by `result_type()`.
    pub(crate) fn result_name(&self) -> &str {
        if let Some(f) = self.fhir {
            return f;
        }
        if let Some(s) = self.system {
            return s.fhir_name();
        }
        &self.name
    }
}

/// Resolved functions. Arguments are kept in `Node::Call::args`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Func {
    // Existence and filtering.
    Empty,
    Exists,
    All,
    AllTrue,
    AnyTrue,
    AllFalse,
    AnyFalse,
    SubsetOf,
    SupersetOf,
    Count,
    Distinct,
    IsDistinct,
    Where,
    Select,
    Repeat,
    Aggregate,
    OfType(TypeSpec),
    Is(TypeSpec),
    As(TypeSpec),
    // Subsetting.
    Single,
    First,
    Last,
    Tail,
    Skip,
    Take,
    Intersect,
    Exclude,
    // Combining.
    Union,
    Combine,
    // Conversion.
    Iif,
    ToBoolean,
    ToInteger,
    ToDecimal,
    ToString,
    ConvertsToBoolean,
    ConvertsToInteger,
    ConvertsToDecimal,
    ConvertsToString,
    ToDate,
    ToDateTime,
    ToTime,
    ConvertsToDate,
    ConvertsToDateTime,
    ConvertsToTime,
    // Strings.
    IndexOf,
    Substring,
    StartsWith,
    EndsWith,
    ContainsStr,
    Upper,
    Lower,
    Replace,
    Length,
    Trim,
    Split,
    Join,
    /// `matches(regex)` (`full == false`) or `matchesFull(regex)`; the regex is compiled
    /// up front when the argument is a string literal.
    Matches {
        full: bool,
        regex: Option<Box<Regex>>,
    },
    /// `replaceMatches(regex, substitution)`.
    ReplaceMatches(Option<Box<Regex>>),
    ToChars,
    // Math.
    Abs,
    Ceiling,
    Floor,
    Round,
    Truncate,
    // Tree navigation.
    Children,
    Descendants,
    // Utility.
    Not,
    HasValue,
    Trace,
    Today,
    Now,
    TimeOfDay,
    LowBoundary,
    HighBoundary,
    // FHIR / SQL-on-FHIR.
    Extension,
    GetResourceKey,
    /// `getReferenceKey([Type])` with the type name resolved at compile time.
    GetReferenceKey(Option<String>),
}

impl Func {
    /// The FHIRPath name of the function.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Func::Empty => "empty",
            Func::Exists => "exists",
            Func::All => "all",
            Func::AllTrue => "allTrue",
            Func::AnyTrue => "anyTrue",
            Func::AllFalse => "allFalse",
            Func::AnyFalse => "anyFalse",
            Func::SubsetOf => "subsetOf",
            Func::SupersetOf => "supersetOf",
            Func::Count => "count",
            Func::Distinct => "distinct",
            Func::IsDistinct => "isDistinct",
            Func::Where => "where",
            Func::Select => "select",
            Func::Repeat => "repeat",
            Func::Aggregate => "aggregate",
            Func::OfType(_) => "ofType",
            Func::Is(_) => "is",
            Func::As(_) => "as",
            Func::Single => "single",
            Func::First => "first",
            Func::Last => "last",
            Func::Tail => "tail",
            Func::Skip => "skip",
            Func::Take => "take",
            Func::Intersect => "intersect",
            Func::Exclude => "exclude",
            Func::Union => "union",
            Func::Combine => "combine",
            Func::Iif => "iif",
            Func::ToBoolean => "toBoolean",
            Func::ToInteger => "toInteger",
            Func::ToDecimal => "toDecimal",
            Func::ToString => "toString",
            Func::ConvertsToBoolean => "convertsToBoolean",
            Func::ConvertsToInteger => "convertsToInteger",
            Func::ConvertsToDecimal => "convertsToDecimal",
            Func::ConvertsToString => "convertsToString",
            Func::ToDate => "toDate",
            Func::ToDateTime => "toDateTime",
            Func::ToTime => "toTime",
            Func::ConvertsToDate => "convertsToDate",
            Func::ConvertsToDateTime => "convertsToDateTime",
            Func::ConvertsToTime => "convertsToTime",
            Func::IndexOf => "indexOf",
            Func::Substring => "substring",
            Func::StartsWith => "startsWith",
            Func::EndsWith => "endsWith",
            Func::ContainsStr => "contains",
            Func::Upper => "upper",
            Func::Lower => "lower",
            Func::Replace => "replace",
            Func::Length => "length",
            Func::Trim => "trim",
            Func::Split => "split",
            Func::Join => "join",
            Func::Matches { full: false, .. } => "matches",
            Func::Matches { full: true, .. } => "matchesFull",
            Func::ReplaceMatches(_) => "replaceMatches",
            Func::ToChars => "toChars",
            Func::Abs => "abs",
            Func::Ceiling => "ceiling",
            Func::Floor => "floor",
            Func::Round => "round",
            Func::Truncate => "truncate",
            Func::Children => "children",
            Func::Descendants => "descendants",
            Func::Not => "not",
            Func::HasValue => "hasValue",
            Func::Trace => "trace",
            Func::Today => "today",
            Func::Now => "now",
            Func::TimeOfDay => "timeOfDay",
            Func::LowBoundary => "lowBoundary",
            Func::HighBoundary => "highBoundary",
            Func::Extension => "extension",
            Func::GetResourceKey => "getResourceKey",
            Func::GetReferenceKey(_) => "getReferenceKey",
        }
    }
}

/// How a function's arguments are handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ArgKind {
    /// Ordinary expressions.
    Values,
    /// A single type specifier (resolved into the `Func`).
    Type,
    /// An optional resource type name (identifier or string).
    OptionalTypeName,
}

struct FuncDef {
    name: &'static str,
    min: usize,
    max: usize,
    kind: ArgKind,
    make: fn() -> Func,
}

macro_rules! fd {
    ($name:literal, $min:literal, $max:literal, $f:expr) => {
        FuncDef {
            name: $name,
            min: $min,
            max: $max,
            kind: ArgKind::Values,
            make: || $f,
        }
    };
}

fn placeholder_type() -> TypeSpec {
    TypeSpec::new(None, String::new())
}

const FUNCS: &[FuncDef] = &[
    fd!("empty", 0, 0, Func::Empty),
    fd!("exists", 0, 1, Func::Exists),
    fd!("all", 1, 1, Func::All),
    fd!("allTrue", 0, 0, Func::AllTrue),
    fd!("anyTrue", 0, 0, Func::AnyTrue),
    fd!("allFalse", 0, 0, Func::AllFalse),
    fd!("anyFalse", 0, 0, Func::AnyFalse),
    fd!("subsetOf", 1, 1, Func::SubsetOf),
    fd!("supersetOf", 1, 1, Func::SupersetOf),
    fd!("count", 0, 0, Func::Count),
    fd!("distinct", 0, 0, Func::Distinct),
    fd!("isDistinct", 0, 0, Func::IsDistinct),
    fd!("where", 1, 1, Func::Where),
    fd!("select", 1, 1, Func::Select),
    fd!("repeat", 1, 1, Func::Repeat),
    fd!("aggregate", 1, 2, Func::Aggregate),
    FuncDef {
        name: "ofType",
        min: 1,
        max: 1,
        kind: ArgKind::Type,
        make: || Func::OfType(placeholder_type()),
    },
    FuncDef {
        name: "is",
        min: 1,
        max: 1,
        kind: ArgKind::Type,
        make: || Func::Is(placeholder_type()),
    },
    FuncDef {
        name: "as",
        min: 1,
        max: 1,
        kind: ArgKind::Type,
        make: || Func::As(placeholder_type()),
    },
    fd!("single", 0, 0, Func::Single),
    fd!("first", 0, 0, Func::First),
    fd!("last", 0, 0, Func::Last),
    fd!("tail", 0, 0, Func::Tail),
    fd!("skip", 1, 1, Func::Skip),
    fd!("take", 1, 1, Func::Take),
    fd!("intersect", 1, 1, Func::Intersect),
    fd!("exclude", 1, 1, Func::Exclude),
    fd!("union", 1, 1, Func::Union),
    fd!("combine", 1, 1, Func::Combine),
    fd!("iif", 2, 3, Func::Iif),
    fd!("toBoolean", 0, 0, Func::ToBoolean),
    fd!("toInteger", 0, 0, Func::ToInteger),
    fd!("toDecimal", 0, 0, Func::ToDecimal),
    fd!("toString", 0, 0, Func::ToString),
    fd!("convertsToBoolean", 0, 0, Func::ConvertsToBoolean),
    fd!("convertsToInteger", 0, 0, Func::ConvertsToInteger),
    fd!("convertsToDecimal", 0, 0, Func::ConvertsToDecimal),
    fd!("convertsToString", 0, 0, Func::ConvertsToString),
    fd!("toDate", 0, 0, Func::ToDate),
    fd!("toDateTime", 0, 0, Func::ToDateTime),
    fd!("toTime", 0, 0, Func::ToTime),
    fd!("convertsToDate", 0, 0, Func::ConvertsToDate),
    fd!("convertsToDateTime", 0, 0, Func::ConvertsToDateTime),
    fd!("convertsToTime", 0, 0, Func::ConvertsToTime),
    fd!("indexOf", 1, 1, Func::IndexOf),
    fd!("substring", 1, 2, Func::Substring),
    fd!("startsWith", 1, 1, Func::StartsWith),
    fd!("endsWith", 1, 1, Func::EndsWith),
    fd!("contains", 1, 1, Func::ContainsStr),
    fd!("upper", 0, 0, Func::Upper),
    fd!("lower", 0, 0, Func::Lower),
    fd!("replace", 2, 2, Func::Replace),
    fd!("length", 0, 0, Func::Length),
    fd!("trim", 0, 0, Func::Trim),
    fd!("split", 1, 1, Func::Split),
    fd!("join", 0, 1, Func::Join),
    fd!(
        "matches",
        1,
        1,
        Func::Matches {
            full: false,
            regex: None
        }
    ),
    fd!(
        "matchesFull",
        1,
        1,
        Func::Matches {
            full: true,
            regex: None
        }
    ),
    fd!("replaceMatches", 2, 2, Func::ReplaceMatches(None)),
    fd!("toChars", 0, 0, Func::ToChars),
    fd!("abs", 0, 0, Func::Abs),
    fd!("ceiling", 0, 0, Func::Ceiling),
    fd!("floor", 0, 0, Func::Floor),
    fd!("round", 0, 1, Func::Round),
    fd!("truncate", 0, 0, Func::Truncate),
    fd!("children", 0, 0, Func::Children),
    fd!("descendants", 0, 0, Func::Descendants),
    fd!("not", 0, 0, Func::Not),
    fd!("hasValue", 0, 0, Func::HasValue),
    fd!("trace", 1, 2, Func::Trace),
    fd!("today", 0, 0, Func::Today),
    fd!("now", 0, 0, Func::Now),
    fd!("timeOfDay", 0, 0, Func::TimeOfDay),
    fd!("lowBoundary", 0, 1, Func::LowBoundary),
    fd!("highBoundary", 0, 1, Func::HighBoundary),
    fd!("extension", 1, 1, Func::Extension),
    fd!("getResourceKey", 0, 0, Func::GetResourceKey),
    FuncDef {
        name: "getReferenceKey",
        min: 0,
        max: 1,
        kind: ArgKind::OptionalTypeName,
        make: || Func::GetReferenceKey(None),
    },
];

/// Built-in environment variables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EnvVar {
    /// `%resource`, `%rootResource`, `%context`.
    Resource,
    /// `%rowIndex`.
    RowIndex,
}

/// AST node.
#[derive(Clone, Debug)]
pub(crate) enum Node {
    /// A literal or user constant; `fhir_type` is its FHIR type name.
    Literal {
        item: Item<'static>,
        fhir_type: String,
    },
    /// `{}`.
    Empty,
    /// `$this`.
    This,
    /// `$index`.
    Index,
    /// `$total`.
    Total,
    /// `%resource` & co.
    Var(EnvVar),
    /// A member (`name`) on `base`, or on the input when `base` is `None`.
    Member {
        base: Option<Box<Node>>,
        name: String,
    },
    /// A function call on `base`, or on the input when `base` is `None`.
    Call {
        base: Option<Box<Node>>,
        func: Func,
        args: Vec<Node>,
    },
    /// `base[index]`.
    Indexer { base: Box<Node>, index: Box<Node> },
    /// Unary minus.
    Neg(Box<Node>),
    /// Binary operator.
    Binary {
        op: BinOp,
        lhs: Box<Node>,
        rhs: Box<Node>,
    },
    /// `lhs is T` (`is == true`) or `lhs as T`.
    TypeOp {
        is: bool,
        lhs: Box<Node>,
        ty: TypeSpec,
    },
}

/// Parse `src` into an AST.
pub(crate) fn parse(src: &str, constants: &Constants) -> Result<Node, FhirPathError> {
    let tokens = tokenize(src).map_err(|LexError { pos, message }| FhirPathError::Parse {
        expr: src.to_string(),
        position: pos,
        message,
    })?;
    let mut p = Parser {
        src,
        tokens,
        pos: 0,
        constants,
    };
    let (node, _) = p.expr(0, 0)?;
    let t = p.peek();
    if t.tok != Tok::Eof {
        return Err(p.err_at(t.pos, &format!("unexpected {}", describe(&t.tok))));
    }
    Ok(node)
}

fn describe(t: &Tok) -> String {
    match t {
        Tok::Ident { name, .. } => format!("`{name}`"),
        Tok::Str(s) => format!("string '{s}'"),
        Tok::Int(s) | Tok::Dec(s) => format!("number {s}"),
        Tok::Date(s) | Tok::DateTime(s) => format!("@{s}"),
        Tok::Time(s) => format!("@T{s}"),
        Tok::Const(s) => format!("%{s}"),
        Tok::Var(s) => format!("${s}"),
        Tok::Sym(s) => format!("`{s}`"),
        Tok::Eof => "end of expression".to_string(),
    }
}

/// Binding power of an infix operator (higher binds tighter), or `None`.
fn infix(t: &Tok) -> Option<(u8, Infix)> {
    let (bp, op) = match t {
        Tok::Sym(s) => match *s {
            "*" => (10, Infix::Bin(BinOp::Mul)),
            "/" => (10, Infix::Bin(BinOp::Div)),
            "+" => (9, Infix::Bin(BinOp::Add)),
            "-" => (9, Infix::Bin(BinOp::Sub)),
            "&" => (9, Infix::Bin(BinOp::Concat)),
            "|" => (7, Infix::Bin(BinOp::Union)),
            "<" => (6, Infix::Bin(BinOp::Lt)),
            ">" => (6, Infix::Bin(BinOp::Gt)),
            "<=" => (6, Infix::Bin(BinOp::Le)),
            ">=" => (6, Infix::Bin(BinOp::Ge)),
            "=" => (5, Infix::Bin(BinOp::Eq)),
            "!=" => (5, Infix::Bin(BinOp::Ne)),
            "~" => (5, Infix::Bin(BinOp::Equiv)),
            "!~" => (5, Infix::Bin(BinOp::NotEquiv)),
            _ => return None,
        },
        Tok::Ident {
            name,
            quoted: false,
        } => match name.as_str() {
            "div" => (10, Infix::Bin(BinOp::IntDiv)),
            "mod" => (10, Infix::Bin(BinOp::Mod)),
            "is" => (8, Infix::Is),
            "as" => (8, Infix::As),
            "in" => (4, Infix::Bin(BinOp::In)),
            "contains" => (4, Infix::Bin(BinOp::Contains)),
            "and" => (3, Infix::Bin(BinOp::And)),
            "or" => (2, Infix::Bin(BinOp::Or)),
            "xor" => (2, Infix::Bin(BinOp::Xor)),
            "implies" => (1, Infix::Bin(BinOp::Implies)),
            _ => return None,
        },
        _ => return None,
    };
    Some((bp, op))
}

/// Binding power of unary `+`/`-` (tighter than `*`, looser than invocation).
const UNARY_BP: u8 = 11;

#[derive(Clone, Copy)]
enum Infix {
    Bin(BinOp),
    Is,
    As,
}

struct Parser<'s, 'c> {
    src: &'s str,
    tokens: Vec<Token>,
    pos: usize,
    constants: &'c Constants,
}

type PResult = Result<(Node, usize), FhirPathError>;

impl Parser<'_, '_> {
    fn peek(&self) -> Token {
        self.tokens
            .get(self.pos)
            .or_else(|| self.tokens.last())
            .cloned()
            .unwrap_or(Token {
                tok: Tok::Eof,
                pos: self.src.len(),
            })
    }

    fn bump(&mut self) -> Token {
        let t = self.peek();
        if self.pos < self.tokens.len() {
            self.pos += 1;
        }
        t
    }

    fn is_sym(&self, s: &str) -> bool {
        matches!(self.tokens.get(self.pos), Some(Token { tok: Tok::Sym(x), .. }) if *x == s)
    }

    fn expect_sym(&mut self, s: &str) -> Result<(), FhirPathError> {
        if self.is_sym(s) {
            self.pos += 1;
            Ok(())
        } else {
            let t = self.peek();
            Err(self.err_at(
                t.pos,
                &format!("expected `{s}`, found {}", describe(&t.tok)),
            ))
        }
    }

    fn err_at(&self, position: usize, message: &str) -> FhirPathError {
        FhirPathError::Parse {
            expr: self.src.to_string(),
            position,
            message: message.to_string(),
        }
    }

    fn too_deep(&self) -> FhirPathError {
        let expr: String = self.src.chars().take(200).collect();
        FhirPathError::TooDeep {
            expr,
            limit: MAX_DEPTH,
        }
    }

    /// Check the depth of a node about to be built from children of depth `child`.
    fn depth(&self, child: usize) -> Result<usize, FhirPathError> {
        let d = child + 1;
        if d > MAX_DEPTH {
            Err(self.too_deep())
        } else {
            Ok(d)
        }
    }

    /// Parse an expression whose operators bind tighter than `min_bp`. `nest` is the syntactic
    /// nesting (parentheses, arguments) used to stop runaway recursion early.
    fn expr(&mut self, min_bp: u8, nest: usize) -> PResult {
        if nest > MAX_DEPTH {
            return Err(self.too_deep());
        }
        let (mut lhs, mut ld) = self.prefix(nest)?;
        loop {
            let t = self.peek();
            let Some((bp, op)) = infix(&t.tok) else {
                break;
            };
            if bp <= min_bp {
                break;
            }
            self.pos += 1;
            match op {
                Infix::Bin(op) => {
                    let (rhs, rd) = self.expr(bp, nest + 1)?;
                    ld = self.depth(ld.max(rd))?;
                    lhs = Node::Binary {
                        op,
                        lhs: Box::new(lhs),
                        rhs: Box::new(rhs),
                    };
                }
                Infix::Is | Infix::As => {
                    let ty = self.type_spec()?;
                    ld = self.depth(ld)?;
                    lhs = Node::TypeOp {
                        is: matches!(op, Infix::Is),
                        lhs: Box::new(lhs),
                        ty,
                    };
                }
            }
        }
        Ok((lhs, ld))
    }

    /// `Name` or `Namespace.Name` after `is`/`as`.
    fn type_spec(&mut self) -> Result<TypeSpec, FhirPathError> {
        let t = self.bump();
        let Tok::Ident { name, .. } = t.tok else {
            return Err(self.err_at(
                t.pos,
                &format!("expected a type name, found {}", describe(&t.tok)),
            ));
        };
        if self.is_sym(".")
            && let Some(Token {
                tok: Tok::Ident { name: inner, .. },
                ..
            }) = self.tokens.get(self.pos + 1).cloned()
        {
            self.pos += 2;
            return Ok(TypeSpec::new(Some(name), inner));
        }
        Ok(TypeSpec::new(None, name))
    }

    fn prefix(&mut self, nest: usize) -> PResult {
        let t = self.peek();
        if let Tok::Sym(s @ ("-" | "+")) = t.tok {
            self.pos += 1;
            let (operand, d) = self.expr(UNARY_BP, nest + 1)?;
            if s == "+" {
                return Ok((operand, d));
            }
            // Fold `-literal` so that `-5` is an Integer literal.
            if let Node::Literal { item, fhir_type } = &operand {
                match item {
                    Item::Integer(i) => {
                        if let Some(n) = i.checked_neg() {
                            return Ok((
                                Node::Literal {
                                    item: Item::Integer(n),
                                    fhir_type: fhir_type.clone(),
                                },
                                d,
                            ));
                        }
                    }
                    Item::Decimal(s) if !s.starts_with('-') => {
                        return Ok((
                            Node::Literal {
                                item: Item::Decimal(format!("-{s}").into()),
                                fhir_type: fhir_type.clone(),
                            },
                            d,
                        ));
                    }
                    _ => {}
                }
            }
            let d = self.depth(d)?;
            return Ok((Node::Neg(Box::new(operand)), d));
        }
        let (mut node, mut d) = self.term(nest)?;
        // Postfix: invocations and indexers.
        loop {
            if self.is_sym(".") {
                self.pos += 1;
                let t = self.bump();
                let Tok::Ident { name, .. } = t.tok else {
                    return Err(self.err_at(
                        t.pos,
                        &format!(
                            "expected a name or function after `.`, found {}",
                            describe(&t.tok)
                        ),
                    ));
                };
                let (n, nd) = self.invocation(Some(Box::new(node)), name, t.pos, d, nest)?;
                node = n;
                d = nd;
            } else if self.is_sym("[") {
                self.pos += 1;
                let (index, id) = self.expr(0, nest + 1)?;
                self.expect_sym("]")?;
                d = self.depth(d.max(id))?;
                node = Node::Indexer {
                    base: Box::new(node),
                    index: Box::new(index),
                };
            } else {
                break;
            }
        }
        Ok((node, d))
    }

    fn term(&mut self, nest: usize) -> PResult {
        let t = self.bump();
        let lit = |item: Item<'static>, ty: &str| {
            Ok((
                Node::Literal {
                    item,
                    fhir_type: ty.to_string(),
                },
                1,
            ))
        };
        match t.tok {
            Tok::Str(s) => lit(Item::String(s.into()), "string"),
            Tok::Int(s) => match s.parse::<i64>() {
                Ok(i) => lit(Item::Integer(i), "integer"),
                Err(_) => Err(self.err_at(t.pos, &format!("integer literal {s} is out of range"))),
            },
            Tok::Dec(s) => lit(Item::Decimal(s.into()), "decimal"),
            Tok::Date(s) => lit(Item::Date(s.into()), "date"),
            Tok::DateTime(s) => lit(Item::DateTime(s.into()), "dateTime"),
            Tok::Time(s) => lit(Item::Time(s.into()), "time"),
            Tok::Const(name) => self.constant(&name, t.pos),
            Tok::Var(name) => match name.as_str() {
                "this" => Ok((Node::This, 1)),
                "index" => Ok((Node::Index, 1)),
                "total" => Ok((Node::Total, 1)),
                _ => Err(self.err_at(t.pos, &format!("unknown variable ${name}"))),
            },
            Tok::Sym("(") => {
                let (e, d) = self.expr(0, nest + 1)?;
                self.expect_sym(")")?;
                Ok((e, d))
            }
            Tok::Sym("{") => {
                self.expect_sym("}")?;
                Ok((Node::Empty, 1))
            }
            Tok::Ident { name, quoted } => {
                if !quoted {
                    match name.as_str() {
                        "true" => return lit(Item::Boolean(true), "boolean"),
                        "false" => return lit(Item::Boolean(false), "boolean"),
                        _ => {}
                    }
                }
                self.invocation(None, name, t.pos, 0, nest)
            }
            other => Err(self.err_at(t.pos, &format!("unexpected {}", describe(&other)))),
        }
    }

    fn constant(&self, name: &str, pos: usize) -> PResult {
        match name {
            "resource" | "rootResource" | "context" => return Ok((Node::Var(EnvVar::Resource), 1)),
            "rowIndex" => return Ok((Node::Var(EnvVar::RowIndex), 1)),
            _ => {}
        }
        if let Some(lit) = self.constants.get(name) {
            return Ok((
                Node::Literal {
                    item: lit.to_item(),
                    fhir_type: lit.fhir_type().to_string(),
                },
                1,
            ));
        }
        let builtin = match name {
            "ucum" => Some("http://unitsofmeasure.org"),
            "sct" => Some("http://snomed.info/sct"),
            "loinc" => Some("http://loinc.org"),
            _ => None,
        };
        match builtin {
            Some(v) => Ok((
                Node::Literal {
                    item: Literal::String {
                        fhir_type: "string".into(),
                        value: v.into(),
                    }
                    .to_item(),
                    fhir_type: "string".into(),
                },
                1,
            )),
            None => Err(FhirPathError::UnknownConstant {
                expr: self.src.to_string(),
                position: pos,
                name: name.to_string(),
            }),
        }
    }

    /// A member access or function call named `name` on `base`.
    fn invocation(
        &mut self,
        base: Option<Box<Node>>,
        name: String,
        pos: usize,
        base_depth: usize,
        nest: usize,
    ) -> PResult {
        if !self.is_sym("(") {
            let d = self.depth(base_depth)?;
            return Ok((Node::Member { base, name }, d));
        }
        self.pos += 1;
        let mut args = Vec::new();
        let mut arg_pos = Vec::new();
        let mut depth = base_depth;
        if !self.is_sym(")") {
            loop {
                arg_pos.push(self.peek().pos);
                let (a, ad) = self.expr(0, nest + 1)?;
                depth = depth.max(ad);
                args.push(a);
                if self.is_sym(",") {
                    self.pos += 1;
                } else {
                    break;
                }
            }
        }
        self.expect_sym(")")?;
        let depth = self.depth(depth)?;
        let Some(def) = FUNCS.iter().find(|f| f.name == name) else {
            return Err(FhirPathError::UnknownFunction {
                expr: self.src.to_string(),
                position: pos,
                name,
            });
        };
        if args.len() < def.min || args.len() > def.max {
            let expected = if def.min == def.max {
                format!("takes {} argument(s)", def.min)
            } else {
                format!("takes {} to {} arguments", def.min, def.max)
            };
            return Err(self.arg_err(pos, def.name, &format!("{expected}, got {}", args.len())));
        }
        let mut func = (def.make)();
        match def.kind {
            ArgKind::Values => {
                // Compile literal regular expressions once, reporting bad ones now.
                if let Some(Node::Literal {
                    item: Item::String(pattern),
                    ..
                }) = args.first()
                {
                    let compiled = match &func {
                        Func::Matches { full: true, .. } => Some(Regex::new_full(pattern)),
                        Func::Matches { .. } | Func::ReplaceMatches(_) => Some(Regex::new(pattern)),
                        _ => None,
                    };
                    if let Some(compiled) = compiled {
                        let compiled = compiled.map_err(|m| self.arg_err(pos, def.name, &m))?;
                        if let Func::Matches { regex, .. } | Func::ReplaceMatches(regex) = &mut func
                        {
                            *regex = Some(Box::new(compiled));
                        }
                    }
                }
            }
            ArgKind::Type => {
                let ty = args
                    .first()
                    .and_then(node_type_spec)
                    .ok_or_else(|| self.arg_err(pos, def.name, "expects a type name argument"))?;
                func = match func {
                    Func::OfType(_) => Func::OfType(ty),
                    Func::Is(_) => Func::Is(ty),
                    _ => Func::As(ty),
                };
                args.clear();
            }
            ArgKind::OptionalTypeName => {
                if let Some(a) = args.first() {
                    let ty = match a {
                        Node::Literal {
                            item: Item::String(s),
                            ..
                        } => Some(s.to_string()),
                        other => node_type_spec(other).map(|t| t.name),
                    };
                    let ty = ty.ok_or_else(|| {
                        self.arg_err(pos, def.name, "expects a resource type name argument")
                    })?;
                    func = Func::GetReferenceKey(Some(ty));
                }
                args.clear();
            }
        }
        Ok((Node::Call { base, func, args }, depth))
    }

    fn arg_err(&self, position: usize, name: &str, message: &str) -> FhirPathError {
        FhirPathError::Arguments {
            expr: self.src.to_string(),
            position,
            name: name.to_string(),
            message: message.to_string(),
        }
    }
}

/// Interpret an argument node as a type specifier: `Name` or `Namespace.Name`.
fn node_type_spec(n: &Node) -> Option<TypeSpec> {
    match n {
        Node::Member { base: None, name } => Some(TypeSpec::new(None, name.clone())),
        Node::Member {
            base: Some(b),
            name,
        } => match b.as_ref() {
            Node::Member {
                base: None,
                name: ns,
            } => Some(TypeSpec::new(Some(ns.clone()), name.clone())),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Render the AST as an S-expression for precedence tests.
    fn sx(n: &Node) -> String {
        match n {
            Node::Literal { item, .. } => match item {
                Item::String(s) => format!("'{s}'"),
                other => other
                    .primitive_text()
                    .map(|c| c.into_owned())
                    .unwrap_or_default(),
            },
            Node::Empty => "{}".into(),
            Node::This => "$this".into(),
            Node::Index => "$index".into(),
            Node::Total => "$total".into(),
            Node::Var(v) => format!("%{v:?}"),
            Node::Member { base, name } => match base {
                Some(b) => format!("{}.{name}", sx(b)),
                None => name.clone(),
            },
            Node::Call { base, func, args } => {
                let a: Vec<String> = args.iter().map(sx).collect();
                let f = format!("{func:?}");
                match base {
                    Some(b) => format!("{}.{f}({})", sx(b), a.join(",")),
                    None => format!("{f}({})", a.join(",")),
                }
            }
            Node::Indexer { base, index } => format!("{}[{}]", sx(base), sx(index)),
            Node::Neg(x) => format!("(- {})", sx(x)),
            Node::Binary { op, lhs, rhs } => {
                format!("({} {} {})", op.symbol(), sx(lhs), sx(rhs))
            }
            Node::TypeOp { is, lhs, ty } => {
                format!(
                    "({} {} {})",
                    if *is { "is" } else { "as" },
                    sx(lhs),
                    ty.name
                )
            }
        }
    }

    fn p(s: &str) -> String {
        sx(&parse(s, &Constants::new()).expect("parses"))
    }

    #[test]
    fn precedence() {
        assert_eq!(p("1 + 2 * 3"), "(+ 1 (* 2 3))");
        assert_eq!(p("1 * 2 + 3"), "(+ (* 1 2) 3)");
        assert_eq!(p("1 - 2 - 3"), "(- (- 1 2) 3)");
        assert_eq!(p("a = b and c or d"), "(or (and (= a b) c) d)");
        assert_eq!(p("a or b and c"), "(or a (and b c))");
        assert_eq!(p("a implies b or c"), "(implies a (or b c))");
        assert_eq!(p("a | b = c"), "(= (| a b) c)");
        assert_eq!(p("a < b = true"), "(= (< a b) true)");
        assert_eq!(p("a in b and c"), "(and (in a b) c)");
        assert_eq!(p("a = b in c"), "(in (= a b) c)");
        assert_eq!(p("-a.b"), "(- a.b)");
        assert_eq!(p("-5 + 2"), "(+ -5 2)");
        assert_eq!(p("2 * -1.5"), "(* 2 -1.5)");
        assert_eq!(p("a is Quantity and b"), "(and (is a Quantity) b)");
        assert_eq!(p("a + b is Integer"), "(is (+ a b) Integer)");
        assert_eq!(p("a xor b or c"), "(or (xor a b) c)");
        assert_eq!(p("a & b + c"), "(+ (& a b) c)");
        assert_eq!(p("a div 2 mod 3"), "(mod (div a 2) 3)");
        assert_eq!(p("(1 + 2) * 3"), "(* (+ 1 2) 3)");
        assert_eq!(p("name[0].family"), "name[0].family");
        assert_eq!(
            p("name.where(use = 'official').family"),
            "name.Where((= use 'official')).family"
        );
        assert_eq!(p("a contains b"), "(contains a b)");
        assert_eq!(p("a.contains('x')"), "a.ContainsStr('x')");
    }

    #[test]
    fn resolves_functions_and_types() {
        let n = parse("value.ofType(FHIR.Quantity)", &Constants::new()).expect("ok");
        let Node::Call {
            func: Func::OfType(t),
            ..
        } = n
        else {
            panic!("not ofType: {n:?}")
        };
        assert_eq!(t.fhir, Some("Quantity"));
        let n = parse("x.is(System.String)", &Constants::new()).expect("ok");
        let Node::Call {
            func: Func::Is(t), ..
        } = n
        else {
            panic!("not is")
        };
        assert_eq!(t.system, Some(SystemType::String));
        assert_eq!(t.fhir, None);
        assert_eq!(
            p("a.getReferenceKey('Patient')"),
            "a.GetReferenceKey(Some(\"Patient\"))()"
        );
        assert_eq!(
            p("a.getReferenceKey(Patient)"),
            "a.GetReferenceKey(Some(\"Patient\"))()"
        );
    }

    #[test]
    fn errors() {
        let c = Constants::new();
        let e = parse("name.foo()", &c).unwrap_err();
        assert!(
            matches!(e, FhirPathError::UnknownFunction { ref name, position: 5, .. } if name == "foo"),
            "{e}"
        );
        assert!(e.to_string().contains("name.foo()"));
        let e = parse("first(1)", &c).unwrap_err();
        assert!(matches!(e, FhirPathError::Arguments { .. }), "{e}");
        let e = parse("%nope", &c).unwrap_err();
        assert!(matches!(e, FhirPathError::UnknownConstant { ref name, .. } if name == "nope"));
        for bad in [
            "@@",
            "a.",
            "a +",
            "(a",
            "a)",
            "a[0",
            "ofType()",
            "ofType(1)",
            "a b",
            "",
            ".a",
            "where(",
            "a..b",
            "a.1",
        ] {
            let e = parse(bad, &c);
            assert!(e.is_err(), "{bad:?} should fail");
        }
    }

    #[test]
    fn depth_limit() {
        let c = Constants::new();
        let deep = format!("{}1{}", "(".repeat(5000), ")".repeat(5000));
        assert!(matches!(
            parse(&deep, &c),
            Err(FhirPathError::TooDeep { .. })
        ));
        let chain = vec!["a"; 5000].join(".");
        assert!(matches!(
            parse(&chain, &c),
            Err(FhirPathError::TooDeep { .. })
        ));
        let sum = vec!["1"; 5000].join("+");
        assert!(matches!(
            parse(&sum, &c),
            Err(FhirPathError::TooDeep { .. })
        ));
        let neg = format!("{}a", "-".repeat(5000));
        assert!(matches!(
            parse(&neg, &c),
            Err(FhirPathError::TooDeep { .. })
        ));
        let ok = vec!["a"; 50].join(".");
        assert!(parse(&ok, &c).is_ok());
    }
}
