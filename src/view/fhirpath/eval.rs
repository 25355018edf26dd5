//! Tree-walking evaluator: navigation, variables, operators and type tests.

use std::borrow::Cow;
use std::cell::Cell;
use std::cmp::Ordering;

use crate::view::json::{Json, JsonObject, JsonRef, bytes_eq, json_ref, member_str, number_text};

use super::functions;
use super::parser::{BinOp, EnvVar, Func, Node, SystemType, TypeSpec};
use super::types::{
    Env, EvalError, EvalResult, Item, choice_suffix_type, fhir_type_is, has_specialisations,
    is_json_string_type,
};
use super::values::{
    Decimal, MAX_DIGITS, MAX_PARSE_SCALE, Sci, Val, compare, equals, equivalent, items_equal, val,
};

/// Work every evaluation may do, however small the resource: every node visited and every item
/// it produces costs one unit. Ordinary view expressions use hundreds.
pub const MAX_EVAL_WORK: usize = 5_000_000;

/// Work allowed per JSON node of the resource: one evaluation may do this much per node of the
/// resource's JSON when that is more than [`MAX_EVAL_WORK`]. A linear expression does a few
/// units per node it reads, so no valid resource is refused for its size; a quadratic one still
/// stops after work linear in the line's size.
pub const EVAL_WORK_PER_NODE: usize = 64;

/// The work one evaluation over `env`'s resource may do: [`MAX_EVAL_WORK`], or
/// [`EVAL_WORK_PER_NODE`] for each node of the resource's JSON when that is more. A linear
/// expression does a few units per node it reads (`telecom.where(system = 'phone')` about
/// eight per telecom), so a valid resource is never refused for its size (a Patient with a
/// million telecoms needs ~8 M); a pathological one (e.g.
/// `descendants().select(descendants())`, quadratic) stops with an error after work linear in
/// the line's size instead of running for minutes.
pub(crate) fn work_limit(env: &Env<'_>) -> usize {
    MAX_EVAL_WORK.max(EVAL_WORK_PER_NODE.saturating_mul(env.resource.document_nodes()))
}

/// Evaluation context: what `$this`, `$index` and `$total` refer to, plus the work budget.
pub(crate) struct Ctx<'e, 'a> {
    pub(crate) env: &'e Env<'a>,
    pub(crate) this: &'e [Item<'a>],
    pub(crate) index: Option<usize>,
    pub(crate) total: Option<&'e [Item<'a>]>,
    pub(crate) budget: &'e Cell<usize>,
}

impl<'e, 'a> Ctx<'e, 'a> {
    /// A context for a lambda argument evaluated on one item.
    pub(crate) fn with_this<'f>(&'f self, this: &'f [Item<'a>], index: usize) -> Ctx<'f, 'a> {
        Ctx {
            env: self.env,
            this,
            index: Some(index),
            total: self.total,
            budget: self.budget,
        }
    }
}

/// Evaluate `node` with `input` as the focus, charging the work budget.
pub(crate) fn eval<'a>(
    node: &Node,
    input: &[Item<'a>],
    ctx: &Ctx<'_, 'a>,
) -> EvalResult<Vec<Item<'a>>> {
    let out = eval_node(node, input, ctx)?;
    charge(ctx, out.len() + 1)?;
    Ok(out)
}

/// Take `units` from the evaluation's work budget.
fn charge(ctx: &Ctx<'_, '_>, units: usize) -> EvalResult<()> {
    let left = ctx.budget.get().checked_sub(units).ok_or_else(|| {
        EvalError::Eval(format!(
            "evaluation exceeded its work limit (the larger of {MAX_EVAL_WORK} units and \
             {EVAL_WORK_PER_NODE} per JSON node of the resource)"
        ))
    })?;
    ctx.budget.set(left);
    Ok(())
}

fn eval_node<'a>(node: &Node, input: &[Item<'a>], ctx: &Ctx<'_, 'a>) -> EvalResult<Vec<Item<'a>>> {
    match node {
        Node::Literal { item, .. } => Ok(vec![item.clone()]),
        Node::Empty => Ok(Vec::new()),
        Node::This => Ok(ctx.this.to_vec()),
        Node::Index => Ok(ctx
            .index
            .and_then(|i| i64::try_from(i).ok())
            .map(Item::Integer)
            .into_iter()
            .collect()),
        Node::Total => Ok(ctx.total.map(<[Item<'a>]>::to_vec).unwrap_or_default()),
        Node::Var(EnvVar::Resource) => Ok(vec![Item::json(ctx.env.resource)]),
        Node::Var(EnvVar::RowIndex) => Ok(vec![Item::Integer(ctx.env.row_index)]),
        Node::Member { base, name } => {
            let mut out = Vec::new();
            if let Some((owner, element)) = primitive_meta_site(name, base.as_deref()) {
                for item in &elements_with_primitive_siblings(owner, element, input, ctx)? {
                    navigate(item, name, &mut out);
                }
                return Ok(out);
            }
            match base {
                Some(b) => {
                    for item in &eval(b, input, ctx)? {
                        navigate(item, name, &mut out);
                    }
                }
                None => {
                    for item in input {
                        navigate(item, name, &mut out);
                    }
                }
            }
            Ok(out)
        }
        Node::Call { base, func, args } => {
            // `x.name.ofType(T)` reads the choice element `nameT` directly.
            if let (Func::OfType(ty), Some(b)) = (func, base)
                && let Node::Member {
                    base: member_base,
                    name,
                } = b.as_ref()
            {
                let parents = match member_base {
                    Some(mb) => eval(mb, input, ctx)?,
                    None => input.to_vec(),
                };
                let mut out = Vec::new();
                for p in &parents {
                    navigate_typed(p, name, ty, &mut out);
                }
                return Ok(out);
            }
            let items = match base {
                Some(b) => match (func, primitive_meta_site("extension", Some(b))) {
                    (Func::Extension, Some((owner, element))) => {
                        elements_with_primitive_siblings(owner, element, input, ctx)?
                    }
                    _ => eval(b, input, ctx)?,
                },
                None => input.to_vec(),
            };
            functions::call(func, items, args, ctx)
        }
        Node::Indexer { base, index } => {
            let items = eval(base, input, ctx)?;
            let idx = eval(index, input, ctx)?;
            let Some(i) = singleton(&idx, "the indexer")? else {
                return Ok(Vec::new());
            };
            let i = match val(i) {
                Some(Val::Int(i)) => i,
                _ => return Err(EvalError::Type("the indexer must be an integer".into())),
            };
            Ok(usize::try_from(i)
                .ok()
                .and_then(|i| items.get(i).cloned())
                .into_iter()
                .collect())
        }
        Node::Neg(x) => {
            let items = eval(x, input, ctx)?;
            let Some(item) = singleton(&items, "unary -")? else {
                return Ok(Vec::new());
            };
            Ok(match val(item) {
                Some(Val::Int(i)) => i.checked_neg().map(Item::Integer),
                Some(Val::Dec(d)) => d.mantissa.checked_neg().map(|mantissa| {
                    decimal_item(Decimal {
                        mantissa,
                        scale: d.scale,
                    })
                }),
                Some(Val::BigDec(text)) => Some(Item::Decimal(Cow::Owned(negate_text(text)))),
                _ => return Err(EvalError::Type("unary - expects a number".into())),
            }
            .into_iter()
            .collect())
        }
        Node::Binary { op, lhs, rhs } => binary(*op, lhs, rhs, input, ctx),
        Node::TypeOp { is, lhs, ty } => {
            let items = eval(lhs, input, ctx)?;
            if *is {
                let Some(item) = singleton(&items, "is")? else {
                    return Ok(Vec::new());
                };
                Ok(vec![Item::Boolean(is_type(item, ty))])
            } else {
                Ok(items.iter().filter_map(|i| as_type(i, ty)).collect())
            }
        }
    }
}

/// The text of `-x` for a decimal's text `x`.
fn negate_text(x: &str) -> String {
    let x = x.trim();
    match x.strip_prefix('-') {
        Some(rest) => rest.to_string(),
        None => format!("-{}", x.strip_prefix('+').unwrap_or(x)),
    }
}

/// A decimal as an item.
pub(crate) fn decimal_item(d: Decimal) -> Item<'static> {
    Item::Decimal(Cow::Owned(d.to_string()))
}

/// Push `v` (flattening arrays, skipping nulls) typed as `fhir_type`.
pub(crate) fn push_flat<'a>(v: Json<'a>, fhir_type: Option<&'a str>, out: &mut Vec<Item<'a>>) {
    match json_ref(v) {
        JsonRef::Null => {}
        JsonRef::Array(a) => out.extend(
            a.iter()
                .filter(|x| !matches!(json_ref(x), JsonRef::Null))
                .map(|value| Item::Json { value, fhir_type }),
        ),
        _ => out.push(Item::Json {
            value: v,
            fhir_type,
        }),
    }
}

/// `owner.element.extension` / `owner.element.id` (and `extension(url)`), where `element` is a
/// member that may be a FHIR primitive: returns `owner` and `element`. FHIR JSON keeps a
/// primitive's `id` and extensions in a sibling member named with an underscore
/// (`"birthDate": "1970-01-01", "_birthDate": {"extension": [...]}`; for arrays `_given` holds
/// them index by index, `null` where an element has none), and the value may be absent
/// altogether (`_birthDate` alone: a data-absent-reason). Navigating `element` alone would find
/// no extension on a string; the evaluator reads `_element` too
/// ([`elements_with_primitive_siblings`]), and member-chain plans leave such expressions to it.
pub(crate) fn primitive_meta_site<'n>(
    name: &str,
    base: Option<&'n Node>,
) -> Option<(Option<&'n Node>, &'n str)> {
    if name != "extension" && name != "id" {
        return None;
    }
    match base {
        Some(Node::Member {
            base,
            name: element,
        }) if element.starts_with(|c: char| c.is_ascii_lowercase()) => {
            Some((base.as_deref(), element))
        }
        _ => None,
    }
}

/// The items of `owner.element`, each owner's followed by those of its `_element` (the ids and
/// extensions of a primitive `element`, see [`primitive_meta_site`]). A complex element has no
/// `_element`, so for it this is `owner.element`.
fn elements_with_primitive_siblings<'a>(
    owner: Option<&Node>,
    element: &str,
    input: &[Item<'a>],
    ctx: &Ctx<'_, 'a>,
) -> EvalResult<Vec<Item<'a>>> {
    let owners = match owner {
        Some(o) => eval(o, input, ctx)?,
        None => input.to_vec(),
    };
    let sibling = format!("_{element}");
    let mut out = Vec::new();
    for o in &owners {
        navigate(o, element, &mut out);
        navigate(o, &sibling, &mut out);
    }
    charge(ctx, out.len() + 1)?;
    Ok(out)
}

/// Navigate to child `name` of `item`: a direct key, the resource itself for a matching
/// resource-type prefix, or a choice element `name[Type]`.
pub(crate) fn navigate<'a>(item: &Item<'a>, name: &str, out: &mut Vec<Item<'a>>) {
    let Item::Json { value, .. } = item else {
        return;
    };
    let JsonRef::Object(m) = json_ref(value) else {
        return;
    };
    if name.starts_with(|c: char| c.is_ascii_uppercase()) {
        if let Some(v) = m.get(name) {
            push_flat(v, None, out);
        } else if member_str(value, "resourceType") == Some(name) {
            out.push(item.clone());
        } else {
            push_choices(m, name.as_bytes(), out);
        }
        return;
    }
    // One pass over the keys for both the exact member (which wins) and the choice elements
    // `name[Type]`: most lookups of optional elements miss, and a miss then costs one scan.
    let start = out.len();
    let exact = m.scan::<true>(name.as_bytes(), |suffix, v| {
        if let Some(t) = choice_type(suffix) {
            push_flat(v, Some(t), out);
        }
    });
    if let Some(v) = exact {
        out.truncate(start);
        push_flat(v, None, out);
    }
}

/// The FHIR type of a choice-element key suffix (`Quantity` of `valueQuantity`).
fn choice_type(suffix: &[u8]) -> Option<&'static str> {
    std::str::from_utf8(suffix)
        .ok()
        .and_then(choice_suffix_type)
}

/// Push the choice elements `name[Type]` of `m`.
fn push_choices<'a>(m: JsonObject<'a>, n: &[u8], out: &mut Vec<Item<'a>>) {
    for (k, v) in m.raw_members() {
        if k.len() > n.len()
            && k[n.len()].is_ascii_uppercase()
            && bytes_eq(&k[..n.len()], n)
            && let Some(t) = choice_type(&k[n.len()..])
        {
            push_flat(v, Some(t), out);
        }
    }
}

/// Navigate to the choice element `name` of type `ty` directly (`value.ofType(Quantity)` reads
/// `valueQuantity`), falling back to generic navigation plus a type filter.
pub(crate) fn navigate_typed<'a>(
    item: &Item<'a>,
    name: &str,
    ty: &TypeSpec,
    out: &mut Vec<Item<'a>>,
) {
    if let (Item::Json { value, .. }, Some(f)) = (item, ty.fhir)
        && let JsonRef::Object(m) = json_ref(value)
        && !name.starts_with(|c: char| c.is_ascii_uppercase())
        && !f.is_empty()
    {
        // One pass: the key `name` + `f` (first letter upper-cased) wins; failing that the
        // plain member `name` (typed by `ofType` below); failing that the choice elements
        // `name[T]` whose type `T` is (a profile of) `f` — what navigating to `name` and
        // filtering by type would give, without a second scan when the element is absent.
        let (n, t) = (name.as_bytes(), f.as_bytes());
        // Other choice elements can only be of type `f` when `f` has specialisations.
        let profiles = has_specialisations(f);
        let start = out.len();
        let mut typed = None;
        let plain = m.scan::<false>(n, |suffix, v| {
            if typed.is_some() {
                return;
            }
            if suffix.len() == t.len()
                && suffix[0] == t[0].to_ascii_uppercase()
                && bytes_eq(&suffix[1..], &t[1..])
            {
                typed = Some(v);
            } else if profiles
                && let Some(actual) = choice_type(suffix)
                && fhir_type_is(actual, f)
            {
                push_flat(v, Some(actual), out);
            }
        });
        if let Some(v) = typed {
            out.truncate(start);
            push_flat(v, Some(f), out);
            return;
        }
        if let Some(v) = plain {
            out.truncate(start);
            push_flat(v, None, out);
            keep_of_type(out, start, ty);
        }
        return;
    }
    let start = out.len();
    navigate(item, name, out);
    keep_of_type(out, start, ty);
}

/// Keep (and type) the items of `out[start..]` that are of type `ty`, in place.
pub(crate) fn keep_of_type(out: &mut Vec<Item<'_>>, start: usize, ty: &TypeSpec) {
    let mut kept = start;
    for i in start..out.len() {
        if let Some(typed) = as_type(&out[i], ty) {
            out[kept] = typed;
            kept += 1;
        }
    }
    out.truncate(kept);
}

/// `item is T`.
pub(crate) fn is_type(item: &Item<'_>, ty: &TypeSpec) -> bool {
    if let Some(f) = ty.fhir {
        return match item {
            Item::Json { value, fhir_type } => match (fhir_type, json_ref(value)) {
                (Some(t), _) => fhir_type_is(t, f),
                (None, JsonRef::String(_)) => is_json_string_type(f),
                (None, JsonRef::Bool(_)) => f == "boolean",
                (None, JsonRef::Number(n)) => {
                    if number_text(n).contains(['.', 'e', 'E']) {
                        f == "decimal"
                    } else {
                        matches!(f, "integer" | "positiveInt" | "unsignedInt" | "decimal")
                    }
                }
                (None, JsonRef::Object(m)) => f == "Reference" && is_reference_shaped(m),
                _ => false,
            },
            Item::Boolean(_) => f == "boolean",
            Item::Integer(_) => f == "integer",
            Item::Decimal(_) => f == "decimal",
            Item::String(_) => {
                is_json_string_type(f) && !matches!(f, "date" | "dateTime" | "instant" | "time")
            }
            Item::Date(_) => f == "date",
            Item::DateTime(_) => matches!(f, "dateTime" | "instant"),
            Item::Time(_) => f == "time",
        };
    }
    if let Some(s) = ty.system {
        let v = val(item);
        return match s {
            SystemType::Boolean => matches!(v, Some(Val::Bool(_))),
            SystemType::String => matches!(v, Some(Val::Str(_))),
            SystemType::Integer => matches!(v, Some(Val::Int(_))),
            SystemType::Decimal => matches!(v, Some(Val::Dec(_) | Val::BigDec(_))),
            SystemType::Date => matches!(v, Some(Val::Date(_))),
            SystemType::DateTime => matches!(v, Some(Val::DateTime(_))),
            SystemType::Time => matches!(v, Some(Val::Time(_))),
            SystemType::Quantity => {
                matches!(item, Item::Json { fhir_type: Some(t), .. } if fhir_type_is(t, "Quantity"))
            }
        };
    }
    // Resource types (and anything else not in the data type tables).
    match item {
        Item::Json { value, fhir_type } => {
            if *fhir_type == Some(ty.name.as_str()) {
                return true;
            }
            let rt = member_str(value, "resourceType");
            match rt {
                Some(rt) => {
                    rt == ty.name
                        || ty.name == "Resource"
                        || (ty.name == "DomainResource"
                            && !matches!(rt, "Bundle" | "Binary" | "Parameters"))
                }
                None => false,
            }
        }
        _ => false,
    }
}

/// Whether an object of unknown type is a FHIR `Reference` by its members: only `reference`
/// (a string), `identifier` (an object), `type`, `display`, `id` (strings) and `extension`,
/// with a `reference` or an `identifier` among them.
///
/// JSON carries no types and the engine has no element definitions, so `subject is Reference`
/// and `subject.ofType(Reference)` on a plain (non-choice) element are decided by shape. No
/// other data type has those members (a `CodeableReference`'s `reference` is an object); a
/// reference with only a `display` stays untyped, as a `Coding` can look the same. Other
/// complex types are not inferred: `name.ofType(HumanName)` is empty.
fn is_reference_shaped(m: JsonObject<'_>) -> bool {
    let mut anchored = false;
    for (k, v) in m {
        match (k, json_ref(v)) {
            ("reference", JsonRef::String(_)) | ("identifier", JsonRef::Object(_)) => {
                anchored = true;
            }
            ("type" | "display" | "id", JsonRef::String(_)) | ("extension", JsonRef::Array(_)) => {}
            // Extensions of the primitive members (`_display`).
            (k, _) if k.starts_with('_') => {}
            _ => return false,
        }
    }
    anchored
}

/// `item as T`: the item (typed as T when that is a FHIR data type) or `None`.
pub(crate) fn as_type<'a>(item: &Item<'a>, ty: &TypeSpec) -> Option<Item<'a>> {
    if !is_type(item, ty) {
        return None;
    }
    Some(match (item, ty.fhir) {
        (
            Item::Json {
                value,
                fhir_type: None,
            },
            Some(f),
        ) => Item::Json {
            value: *value,
            fhir_type: Some(f),
        },
        _ => item.clone(),
    })
}

/// The single item of a collection, `None` when empty, an error when there are several.
pub(crate) fn singleton<'i, 'a>(
    items: &'i [Item<'a>],
    what: &str,
) -> EvalResult<Option<&'i Item<'a>>> {
    match items {
        [] => Ok(None),
        [one] => Ok(Some(one)),
        _ => Err(EvalError::Eval(format!(
            "{what} expects a single item, got {}",
            items.len()
        ))),
    }
}

/// FHIRPath singleton evaluation of a collection as a boolean: empty -> unknown, a single
/// boolean -> itself, any other single item -> true, several items -> error.
pub(crate) fn to_bool(items: &[Item<'_>], what: &str) -> EvalResult<Option<bool>> {
    Ok(match singleton(items, what)? {
        None => None,
        Some(Item::Boolean(b)) => Some(*b),
        Some(Item::Json { value, .. }) => match json_ref(value) {
            JsonRef::Bool(b) => Some(b),
            _ => Some(true),
        },
        Some(_) => Some(true),
    })
}

fn bool_result(b: Option<bool>) -> Vec<Item<'static>> {
    b.map(Item::Boolean).into_iter().collect()
}

fn binary<'a>(
    op: BinOp,
    lhs: &Node,
    rhs: &Node,
    input: &[Item<'a>],
    ctx: &Ctx<'_, 'a>,
) -> EvalResult<Vec<Item<'a>>> {
    let sym = op.symbol();
    match op {
        BinOp::And | BinOp::Or | BinOp::Implies => {
            let l = to_bool(&eval(lhs, input, ctx)?, sym)?;
            // Short-circuit where the right side cannot change the result.
            let decided = match op {
                BinOp::And => (l == Some(false)).then_some(false),
                BinOp::Or => (l == Some(true)).then_some(true),
                _ => (l == Some(false)).then_some(true),
            };
            if let Some(b) = decided {
                return Ok(vec![Item::Boolean(b)]);
            }
            let r = to_bool(&eval(rhs, input, ctx)?, sym)?;
            let res = match op {
                BinOp::And => match (l, r) {
                    (_, Some(false)) => Some(false),
                    (Some(true), Some(true)) => Some(true),
                    _ => None,
                },
                BinOp::Or => match (l, r) {
                    (_, Some(true)) => Some(true),
                    (Some(false), Some(false)) => Some(false),
                    _ => None,
                },
                _ => match (l, r) {
                    (_, Some(true)) => Some(true),
                    (Some(true), r) => r,
                    _ => None,
                },
            };
            return Ok(bool_result(res));
        }
        _ => {}
    }
    let l = eval(lhs, input, ctx)?;
    let r = eval(rhs, input, ctx)?;
    match op {
        BinOp::Xor => {
            let a = to_bool(&l, sym)?;
            let b = to_bool(&r, sym)?;
            Ok(bool_result(a.zip(b).map(|(a, b)| a != b)))
        }
        BinOp::Eq => Ok(bool_result(collections_equal(&l, &r))),
        BinOp::Ne => Ok(bool_result(collections_equal(&l, &r).map(|b| !b))),
        BinOp::Equiv => Ok(vec![Item::Boolean(collections_equivalent(&l, &r))]),
        BinOp::NotEquiv => Ok(vec![Item::Boolean(!collections_equivalent(&l, &r))]),
        BinOp::Lt | BinOp::Gt | BinOp::Le | BinOp::Ge => {
            let (Some(a), Some(b)) = (singleton(&l, sym)?, singleton(&r, sym)?) else {
                return Ok(Vec::new());
            };
            let (Some(a), Some(b)) = (val(a), val(b)) else {
                return Ok(Vec::new());
            };
            let Some(ord) = compare(&a, &b) else {
                return Ok(Vec::new());
            };
            let res = match op {
                BinOp::Lt => ord == Ordering::Less,
                BinOp::Gt => ord == Ordering::Greater,
                BinOp::Le => ord != Ordering::Greater,
                _ => ord != Ordering::Less,
            };
            Ok(vec![Item::Boolean(res)])
        }
        BinOp::Union => {
            let mut out: Vec<Item<'a>> = Vec::with_capacity(l.len() + r.len());
            for item in l.into_iter().chain(r) {
                if !out.iter().any(|o| items_equal(o, &item)) {
                    out.push(item);
                }
            }
            Ok(out)
        }
        BinOp::In | BinOp::Contains => {
            let (needle, hay) = if op == BinOp::In { (&l, &r) } else { (&r, &l) };
            let Some(n) = singleton(needle, sym)? else {
                return Ok(Vec::new());
            };
            Ok(vec![Item::Boolean(hay.iter().any(|h| items_equal(h, n)))])
        }
        BinOp::Concat => {
            let text = |items: &[Item<'a>]| -> EvalResult<String> {
                Ok(match singleton(items, sym)? {
                    None => String::new(),
                    Some(i) => i
                        .primitive_text()
                        .ok_or_else(|| EvalError::Type("& expects strings".into()))?
                        .into_owned(),
                })
            };
            Ok(vec![Item::String(Cow::Owned(text(&l)? + &text(&r)?))])
        }
        _ => {
            let (Some(a), Some(b)) = (singleton(&l, sym)?, singleton(&r, sym)?) else {
                return Ok(Vec::new());
            };
            let (Some(a), Some(b)) = (val(a), val(b)) else {
                return Ok(Vec::new());
            };
            Ok(arithmetic(op, &a, &b)?.into_iter().collect())
        }
    }
}

/// `=` over collections: empty when either side is empty.
pub(crate) fn collections_equal(l: &[Item<'_>], r: &[Item<'_>]) -> Option<bool> {
    if l.is_empty() || r.is_empty() {
        return None;
    }
    if l.len() != r.len() {
        return Some(false);
    }
    let mut uncertain = false;
    for (a, b) in l.iter().zip(r) {
        let (Some(a), Some(b)) = (val(a), val(b)) else {
            return Some(false);
        };
        match equals(&a, &b) {
            Some(false) => return Some(false),
            None => uncertain = true,
            Some(true) => {}
        }
    }
    if uncertain { None } else { Some(true) }
}

/// `~` over collections (order-independent).
fn collections_equivalent(l: &[Item<'_>], r: &[Item<'_>]) -> bool {
    if l.len() != r.len() {
        return false;
    }
    let equiv = |a: &Item<'_>, b: &Item<'_>| match (val(a), val(b)) {
        (Some(x), Some(y)) => equivalent(&x, &y),
        _ => false,
    };
    l.iter().all(|a| r.iter().any(|b| equiv(a, b)))
}

fn type_name(v: &Val<'_>) -> &'static str {
    match v {
        Val::Bool(_) => "Boolean",
        Val::Int(_) => "Integer",
        Val::Dec(_) | Val::BigDec(_) | Val::BadNumber => "Decimal",
        Val::Str(_) => "String",
        Val::Date(_) => "Date",
        Val::DateTime(_) => "DateTime",
        Val::Time(_) => "Time",
        Val::Node(_) => "an element",
    }
}

fn as_decimal(v: &Val<'_>) -> Option<Decimal> {
    match v {
        Val::Int(i) => Some(Decimal::from_i64(*i)),
        Val::Dec(d) => Some(*d),
        _ => None,
    }
}

/// The error for arithmetic on a decimal too large for [`Decimal`] (a [`Val::BigDec`]).
pub(crate) fn too_big(what: &str, text: &str) -> EvalError {
    let Some(x) = Sci::parse(text) else {
        return EvalError::Type(format!("{what} expects a number"));
    };
    let shown: String = if text.len() > 48 {
        text.chars().take(40).chain("…".chars()).collect()
    } else {
        text.to_string()
    };
    let plural = |n: i64| if n == 1 { "" } else { "s" };
    let (n, f) = (
        i64::try_from(x.digit_count()).unwrap_or(i64::MAX),
        x.frac_digits(),
    );
    EvalError::Eval(format!(
        "{what}: the decimal {shown} has {n} significant digit{} and {f} fraction digit{}; \
         FHIRPath arithmetic here is limited to {MAX_DIGITS} significant digits and \
         {MAX_PARSE_SCALE} fraction digits (comparisons are exact at any size)",
        plural(n),
        plural(f),
    ))
}

/// `+ - * / div mod` on two single values; `None` for an empty result (overflow, division by
/// zero).
fn arithmetic(op: BinOp, a: &Val<'_>, b: &Val<'_>) -> EvalResult<Option<Item<'static>>> {
    if let (Val::Int(x), Val::Int(y)) = (a, b) {
        let r = match op {
            BinOp::Add => x.checked_add(*y),
            BinOp::Sub => x.checked_sub(*y),
            BinOp::Mul => x.checked_mul(*y),
            BinOp::IntDiv => x.checked_div(*y),
            BinOp::Mod => x.checked_rem(*y),
            _ => {
                return Ok(Decimal::from_i64(*x)
                    .div(Decimal::from_i64(*y))
                    .map(decimal_item));
            }
        };
        return Ok(r.map(Item::Integer));
    }
    let numeric = |v: &Val<'_>| matches!(v, Val::Int(_) | Val::Dec(_) | Val::BigDec(_));
    if numeric(a) && numeric(b) {
        for v in [a, b] {
            if let Val::BigDec(text) = v {
                return Err(too_big(&format!("`{}`", op.symbol()), text));
            }
        }
    }
    if let (Some(x), Some(y)) = (as_decimal(a), as_decimal(b)) {
        let r = match op {
            BinOp::Add => x.add(y),
            BinOp::Sub => x.sub(y),
            BinOp::Mul => x.mul(y),
            BinOp::Div => x.div(y),
            BinOp::IntDiv => {
                return Ok(x
                    .div_mod(y)
                    .and_then(|(q, _)| i64::try_from(q).ok())
                    .map(Item::Integer));
            }
            _ => x.div_mod(y).map(|(_, r)| r),
        };
        return Ok(r.map(decimal_item));
    }
    if let (BinOp::Add, Val::Str(x), Val::Str(y)) = (op, a, b) {
        return Ok(Some(Item::String(Cow::Owned(format!("{x}{y}")))));
    }
    Err(EvalError::Type(format!(
        "cannot apply `{}` to {} and {}",
        op.symbol(),
        type_name(a),
        type_name(b)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::json::json_doc as json;

    fn nav<'a>(v: &Json<'a>, name: &str) -> Vec<Item<'a>> {
        let mut out = Vec::new();
        navigate(&Item::json(*v), name, &mut out);
        out
    }

    fn ty(name: &str) -> TypeSpec {
        let src = format!("ofType({name})");
        match super::super::parser::parse(&src, &super::super::types::Constants::new()) {
            Ok(Node::Call {
                func: Func::OfType(t),
                ..
            }) => t,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn navigation_rules() {
        let v = json!({"resourceType": "Observation", "a": [1, null, 2], "n": null,
                       "valueQuantity": {"value": 1}, "valueSet": "x"});
        assert_eq!(nav(&v, "a").len(), 2);
        assert!(nav(&v, "n").is_empty());
        assert!(nav(&v, "missing").is_empty());
        assert_eq!(nav(&v, "Observation").len(), 1);
        assert!(nav(&v, "Patient").is_empty());
        let value = nav(&v, "value");
        assert!(matches!(
            value.as_slice(),
            [Item::Json {
                fhir_type: Some("Quantity"),
                ..
            }]
        ));
        // Navigation into primitives or computed values yields nothing.
        let mut out = Vec::new();
        navigate(&Item::Integer(1), "a", &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn type_tests() {
        let s = json!("x");
        let n = json!(1);
        let d = crate::view::json::leak_json("1.5").expect("valid");
        let o = json!({"a": 1});
        assert!(is_type(&Item::json(s), &ty("code")));
        assert!(is_type(&Item::json(s), &ty("dateTime")));
        assert!(!is_type(&Item::json(s), &ty("integer")));
        assert!(is_type(&Item::json(n), &ty("integer")));
        assert!(is_type(&Item::json(n), &ty("decimal")));
        assert!(!is_type(&Item::json(d), &ty("integer")));
        assert!(!is_type(&Item::json(o), &ty("Quantity")));
        let typed = Item::Json {
            value: o,
            fhir_type: Some("Age"),
        };
        assert!(is_type(&typed, &ty("Quantity")));
        assert!(is_type(&typed, &ty("System.Quantity")));
        assert!(is_type(&Item::Integer(1), &ty("System.Integer")));
        assert!(!is_type(&Item::Integer(1), &ty("System.Decimal")));
        assert!(is_type(&Item::String("a".into()), &ty("String")));
    }

    #[test]
    fn singleton_rules() {
        assert_eq!(to_bool(&[], "x"), Ok(None));
        assert_eq!(to_bool(&[Item::Boolean(false)], "x"), Ok(Some(false)));
        assert_eq!(to_bool(&[Item::Integer(0)], "x"), Ok(Some(true)));
        assert!(to_bool(&[Item::Boolean(true), Item::Boolean(true)], "x").is_err());
        assert_eq!(collections_equal(&[], &[Item::Integer(1)]), None);
        assert_eq!(
            collections_equal(&[Item::Integer(1)], &[Item::Integer(1), Item::Integer(1)]),
            Some(false)
        );
        assert_eq!(
            collections_equal(
                &[Item::Date("2020".into())],
                &[Item::Date("2020-01".into())]
            ),
            None
        );
    }
}
