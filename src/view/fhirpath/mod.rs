//! FHIRPath engine for ViewDefinition paths.
//!
//! SQL-on-FHIR views select columns with FHIRPath expressions (`name.where(use = 'official')
//! .family`, `value.ofType(Quantity).value`, `link.other.getReferenceKey(Patient)`). The same
//! expression runs once per resource (or per `forEach` item), so expressions are compiled once
//! into an [`Expression`] — parsed, with functions, arities, type names and user constants
//! resolved, so that a typo fails when the view is loaded rather than on the millionth resource
//! — and then evaluated directly over the parsed [`Json`](crate::view::json::Json) tree without copying it: results
//! are [`Item`]s that borrow the input.
//!
//! What is covered: the SQL-on-FHIR "shareable" subset (navigation, `where`, `exists`, `empty`,
//! `first`, `ofType`, `extension`, `not`, `and`/`or`, comparisons, `+ - * /`, indexers,
//! constants, `getResourceKey`, `getReferenceKey`, `%rowIndex`), the experimental `join`,
//! `lowBoundary` and `highBoundary`, and most of FHIRPath's other functions and operators
//! (`select`, `iif`, `distinct`, string and math functions, `is`/`as`, `|`, `in`/`contains`,
//! `implies`, `xor`, `matches`/`matchesFull`/`replaceMatches` on the `regex` crate — linear
//! time, single-line mode, `$1`/`${name}` in substitutions, and no back-references or
//! look-around, which fail to compile (see `regex.rs`) — ...). Not covered: quantities with
//! units, date arithmetic, `sort`, `resolve()`, terminology functions.
//!
//! Semantics worth knowing:
//!
//! * JSON carries no FHIR types, so a node's type is known only from a choice-element key
//!   (`valueQuantity`, `effectiveInstant`) or after `ofType(T)`; `ofType` on an untyped
//!   primitive falls back to the JSON kind (a string matches any string-like FHIR type), an
//!   untyped object is a `Reference` when its members are those of one (with a `reference` or
//!   `identifier`), and no other complex type is inferred. `toDate()` on an untyped string
//!   that is a dateTime with a time (`authoredOn`) gives its date.
//! * A primitive's `id` and extensions are in its `_name` sibling in FHIR JSON (`_given` index by
//!   index beside `given`): `birthDate.extension(url)`, `given.extension`, `birthDate.id` read
//!   it, also when the value is absent (`_gender` alone, a data-absent-reason). Only directly
//!   after a member step (`x.name.extension`); `birthDate.exists()` is still `false` when only
//!   `_birthDate` is there.
//! * Empty operands propagate: `{} = 1` is empty, and `and`/`or`/`not()` use three-valued
//!   logic.
//! * Decimals are exact (an `i128` mantissa and a scale; see `values.rs`), keep their written
//!   precision, and print in plain lexical form (`3 / 2` is `1.5`, `1.0.lowBoundary()` is
//!   `0.95`). Integer arithmetic overflow and division by zero give an empty result. Larger
//!   decimals (FHIR's have any precision) compare exactly; arithmetic on one that does not fit
//!   even without its trailing zeros is an error naming its size.
//! * Dates and times compare with FHIRPath precision rules: `@2020 = @2020-01` is empty
//!   (uncertain), offsets are normalised when both sides have one, and a JSON string compared
//!   with a date/time literal or constant is read as one.
//! * `getResourceKey()` is the `id` of the input resource (of [`Env::resource`] when the input
//!   is not a resource, e.g. inside `forEach`); `getReferenceKey([T])` is the `id` of a
//!   `T/id`, `.../T/id` or `T/id/_history/v` reference (empty when `T` is given and differs),
//!   and the `<id>` of a `urn:uuid:<id>` reference — Synthea's bundles and some servers'
//!   exports point at a resource whose id is that uuid. A uuid carries no type, so it is
//!   returned whatever `T` is asked for: `subject.getReferenceKey(Patient)` and
//!   `subject.getReferenceKey(Group)` both give it, and only a join tells which it is. It is
//!   empty for `#contained`, other `urn:` forms (`urn:oid:`) and anything else.
//! * `join()` of an empty collection is empty, as FHIRPath and the newer SQL-on-FHIR suite
//!   (`fn_join.json`) say; the older suite's `fhirpath.json` expected `''`.
//! * Expressions nest at most [`MAX_DEPTH`] levels; deeper ones fail to compile with
//!   [`FhirPathError::TooDeep`], so evaluation never overflows the stack. One evaluation does at
//!   most [`MAX_EVAL_WORK`] units of work, or [`EVAL_WORK_PER_NODE`] per node of the resource
//!   when that is more: no expression runs away, and no resource is refused for its size.

mod eval;
mod functions;
mod lexer;
mod parser;
mod path;
mod regex;
mod types;
mod values;

pub(crate) use eval::push_flat;
pub use eval::{EVAL_WORK_PER_NODE, MAX_EVAL_WORK};
pub use functions::MAX_REPEAT_ITEMS;
pub(crate) use functions::{ParsedReference, parse_reference};
pub use parser::MAX_DEPTH;
pub(crate) use path::{PathPlan, Step};
pub use types::{Constants, Env, FhirPathError, Item, Literal};
pub(crate) use types::{choice_suffix_type, fhir_type_is, has_specialisations};
pub use values::DIV_SCALE;
#[cfg(test)]
pub(crate) use {
    eval::{navigate, navigate_typed},
    parser::TypeSpec,
};

use parser::{BinOp, EnvVar, Func, Node};

/// A compiled FHIRPath expression: parsed once, evaluated many times.
#[derive(Clone, Debug)]
pub struct Expression {
    src: String,
    root: Node,
    /// The fast path, when the expression is a plain member chain (see `path.rs`).
    plan: Option<path::PathPlan>,
    result_type: Option<String>,
}

impl Expression {
    /// Parse and compile `src`.
    ///
    /// `constants` resolve `%name` at compile time. `%rowIndex`, `%resource`, `%rootResource`
    /// and `%context` are variables read from [`Env`] at evaluation time. An unknown `%name`,
    /// unknown function, wrong arity or syntax error is an error naming the expression and the
    /// byte offset.
    pub fn compile(src: &str, constants: &Constants) -> Result<Expression, FhirPathError> {
        let root = parser::parse(src, constants)?;
        let result_type = static_type(&root).map(str::to_string);
        let plan = path::PathPlan::of(&root);
        Ok(Expression {
            src: src.to_string(),
            root,
            plan,
            result_type,
        })
    }

    /// The member-chain plan, when the expression is one (see `path.rs`).
    pub(crate) fn plan(&self) -> Option<&PathPlan> {
        self.plan.as_ref()
    }

    /// Evaluate with `focus` as the input collection (usually the resource or the current
    /// `forEach` item). `$this` at the top level is `focus`.
    pub fn evaluate<'a>(
        &self,
        focus: &[Item<'a>],
        env: &Env<'a>,
    ) -> Result<Vec<Item<'a>>, FhirPathError> {
        self.evaluate_with_budget(focus, env, eval::work_limit(env))
    }

    /// [`Expression::evaluate`] appending to `out`, with `tmp` as a step buffer: member chains
    /// then allocate nothing once the two buffers have grown. On error `out` is unchanged.
    pub(crate) fn evaluate_into<'a>(
        &self,
        focus: &[Item<'a>],
        env: &Env<'a>,
        out: &mut Vec<Item<'a>>,
        tmp: &mut Vec<Item<'a>>,
    ) -> Result<(), FhirPathError> {
        if let Some(plan) = &self.plan {
            plan.evaluate_into(focus, env, out, tmp);
            return Ok(());
        }
        out.extend(self.evaluate_tree_with_budget(focus, env, eval::work_limit(env))?);
        Ok(())
    }

    /// [`Expression::evaluate`] with a work limit other than [`eval::work_limit`]'s.
    pub(crate) fn evaluate_with_budget<'a>(
        &self,
        focus: &[Item<'a>],
        env: &Env<'a>,
        work: usize,
    ) -> Result<Vec<Item<'a>>, FhirPathError> {
        if let Some(plan) = &self.plan {
            return Ok(plan.evaluate(focus, env));
        }
        self.evaluate_tree_with_budget(focus, env, work)
    }

    /// The tree-walking evaluation, without the fast path (tests compare the two).
    #[cfg(test)]
    pub(crate) fn evaluate_tree<'a>(
        &self,
        focus: &[Item<'a>],
        env: &Env<'a>,
    ) -> Result<Vec<Item<'a>>, FhirPathError> {
        self.evaluate_tree_with_budget(focus, env, eval::work_limit(env))
    }

    fn evaluate_tree_with_budget<'a>(
        &self,
        focus: &[Item<'a>],
        env: &Env<'a>,
        work: usize,
    ) -> Result<Vec<Item<'a>>, FhirPathError> {
        let budget = std::cell::Cell::new(work);
        let ctx = eval::Ctx {
            env,
            this: focus,
            index: None,
            total: None,
            budget: &budget,
        };
        eval::eval(&self.root, focus, &ctx).map_err(|e| e.with_expr(&self.src))
    }

    /// The FHIR type name of the result when statically known: `boolean` for
    /// `exists()`/`empty()`/comparisons/`and`/`or`/`not()`, `string` for `join()`,
    /// `getResourceKey()` and `getReferenceKey()`, `integer` for `%rowIndex` and `count()`, `T`
    /// for a path ending in `ofType(T)`, the constant's type for `%c`, the input type for
    /// `first()`, `lowBoundary()` and similar; `None` otherwise.
    pub fn result_type(&self) -> Option<&str> {
        self.result_type.as_deref()
    }

    /// The source text.
    pub fn source(&self) -> &str {
        &self.src
    }
}

impl std::fmt::Display for Expression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.src)
    }
}

/// The statically known FHIR type of a node's result.
fn static_type(node: &Node) -> Option<&str> {
    match node {
        Node::Literal { fhir_type, .. } => Some(fhir_type),
        Node::Var(EnvVar::RowIndex) | Node::Index => Some("integer"),
        Node::Neg(x) => static_type(x),
        Node::Binary { op, lhs, rhs } => match op {
            BinOp::Lt
            | BinOp::Gt
            | BinOp::Le
            | BinOp::Ge
            | BinOp::Eq
            | BinOp::Ne
            | BinOp::Equiv
            | BinOp::NotEquiv
            | BinOp::In
            | BinOp::Contains
            | BinOp::And
            | BinOp::Or
            | BinOp::Xor
            | BinOp::Implies => Some("boolean"),
            BinOp::Concat => Some("string"),
            BinOp::Div => Some("decimal"),
            BinOp::IntDiv => Some("integer"),
            BinOp::Union => {
                let (l, r) = (static_type(lhs)?, static_type(rhs)?);
                (l == r).then_some(l)
            }
            BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Mod => {
                let (l, r) = (static_type(lhs)?, static_type(rhs)?);
                match (l, r) {
                    ("integer", "integer") => Some("integer"),
                    ("integer" | "decimal", "integer" | "decimal") => Some("decimal"),
                    ("string", "string") if *op == BinOp::Add => Some("string"),
                    _ => None,
                }
            }
        },
        Node::TypeOp { is: true, .. } => Some("boolean"),
        Node::TypeOp { is: false, ty, .. } => Some(ty.result_name()),
        Node::Call { base, func, args } => {
            let input = || base.as_deref().and_then(static_type);
            match func {
                Func::Empty
                | Func::Exists
                | Func::All
                | Func::AllTrue
                | Func::AnyTrue
                | Func::AllFalse
                | Func::AnyFalse
                | Func::SubsetOf
                | Func::SupersetOf
                | Func::IsDistinct
                | Func::Is(_)
                | Func::ConvertsToBoolean
                | Func::ConvertsToInteger
                | Func::ConvertsToDecimal
                | Func::ConvertsToString
                | Func::ConvertsToDate
                | Func::ConvertsToDateTime
                | Func::ConvertsToTime
                | Func::Matches { .. }
                | Func::StartsWith
                | Func::EndsWith
                | Func::ContainsStr
                | Func::Not
                | Func::HasValue
                | Func::ToBoolean => Some("boolean"),
                Func::Join
                | Func::GetResourceKey
                | Func::GetReferenceKey(_)
                | Func::ToString
                | Func::Substring
                | Func::Upper
                | Func::Lower
                | Func::Replace
                | Func::ReplaceMatches(_)
                | Func::Trim
                | Func::Split
                | Func::ToChars => Some("string"),
                Func::Count
                | Func::Length
                | Func::IndexOf
                | Func::ToInteger
                | Func::Ceiling
                | Func::Floor
                | Func::Truncate => Some("integer"),
                Func::ToDecimal | Func::Round => Some("decimal"),
                Func::ToDate | Func::Today => Some("date"),
                Func::Now => Some("dateTime"),
                Func::TimeOfDay => Some("time"),
                Func::ToDateTime => Some("dateTime"),
                Func::ToTime => Some("time"),
                Func::OfType(ty) | Func::As(ty) => Some(ty.result_name()),
                Func::First
                | Func::Last
                | Func::Single
                | Func::Tail
                | Func::Skip
                | Func::Take
                | Func::Where
                | Func::Distinct
                | Func::Intersect
                | Func::Exclude
                | Func::Trace
                | Func::Abs
                | Func::LowBoundary
                | Func::HighBoundary => input(),
                Func::Union | Func::Combine => {
                    let (l, r) = (input()?, static_type(args.first()?)?);
                    (l == r).then_some(l)
                }
                Func::Iif => {
                    let (a, b) = (static_type(args.get(1)?)?, static_type(args.get(2)?)?);
                    (a == b).then_some(a)
                }
                Func::Select
                | Func::Aggregate
                | Func::Repeat
                | Func::Children
                | Func::Descendants
                | Func::Extension => None,
            }
        }
        Node::Empty
        | Node::This
        | Node::Total
        | Node::Var(EnvVar::Resource)
        | Node::Member { .. }
        | Node::Indexer { .. } => None,
    }
}

#[cfg(test)]
mod tests;
