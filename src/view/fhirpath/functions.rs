//! Function implementations.

use std::borrow::Cow;
use std::collections::HashSet;

use crate::view::json::{JsonRef, bytes_eq, json_ref, member_str};

use super::eval::{
    Ctx, as_type, decimal_item, eval, is_type, navigate, singleton, to_bool, too_big,
};
use super::parser::{Func, Node};
use super::regex::Regex;
use super::types::{Env, EvalError, EvalResult, Item, choice_suffix_type};
use super::values::{Decimal, Temporal, TemporalKind, Val, civil_from_days, items_equal, val};

/// Upper bound on the items `repeat()`/`descendants()` may produce, so a self-feeding projection
/// ends with an error instead of exhausting memory.
pub const MAX_REPEAT_ITEMS: usize = 100_000;

/// Evaluate `func` on `items` (the function's input collection).
pub(crate) fn call<'a>(
    func: &Func,
    items: Vec<Item<'a>>,
    args: &[Node],
    ctx: &Ctx<'_, 'a>,
) -> EvalResult<Vec<Item<'a>>> {
    // Ordinary (non-lambda) arguments are evaluated against the enclosing `$this`.
    let arg = |i: usize| -> EvalResult<Vec<Item<'a>>> {
        match args.get(i) {
            Some(n) => eval(n, ctx.this, ctx),
            None => Ok(Vec::new()),
        }
    };
    let bool_out = |b: bool| Ok(vec![Item::Boolean(b)]);
    match func {
        Func::Empty => bool_out(items.is_empty()),
        Func::Exists => match args.first() {
            None => bool_out(!items.is_empty()),
            Some(crit) => bool_out(!filter(&items, crit, ctx)?.is_empty()),
        },
        Func::All => {
            let Some(crit) = args.first() else {
                return bool_out(true);
            };
            for (i, item) in items.iter().enumerate() {
                let one = std::slice::from_ref(item);
                let c = ctx.with_this(one, i);
                if to_bool(&eval(crit, one, &c)?, "all()")? != Some(true) {
                    return bool_out(false);
                }
            }
            bool_out(true)
        }
        Func::AllTrue | Func::AnyTrue | Func::AllFalse | Func::AnyFalse => {
            let mut bools = Vec::with_capacity(items.len());
            for i in &items {
                match val(i) {
                    Some(Val::Bool(b)) => bools.push(b),
                    _ => return Err(EvalError::Type("expects a collection of booleans".into())),
                }
            }
            bool_out(match func {
                Func::AllTrue => bools.iter().all(|b| *b),
                Func::AnyTrue => bools.iter().any(|b| *b),
                Func::AllFalse => bools.iter().all(|b| !*b),
                _ => bools.iter().any(|b| !*b),
            })
        }
        Func::SubsetOf | Func::SupersetOf => {
            let other = arg(0)?;
            let (small, big) = if *func == Func::SubsetOf {
                (&items, &other)
            } else {
                (&other, &items)
            };
            bool_out(small.iter().all(|s| big.iter().any(|b| items_equal(s, b))))
        }
        Func::Count => Ok(vec![Item::Integer(
            i64::try_from(items.len()).unwrap_or(i64::MAX),
        )]),
        Func::Distinct => Ok(distinct(items)),
        Func::IsDistinct => {
            let n = items.len();
            bool_out(distinct(items).len() == n)
        }
        Func::Where => match args.first() {
            Some(crit) => filter(&items, crit, ctx),
            None => Ok(items),
        },
        Func::Select => {
            let Some(proj) = args.first() else {
                return Ok(items);
            };
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let one = std::slice::from_ref(item);
                out.extend(eval(proj, one, &ctx.with_this(one, i))?);
            }
            Ok(out)
        }
        Func::Repeat => {
            let Some(proj) = args.first() else {
                return Ok(items);
            };
            // The input itself is not part of the result, only what the projection reaches.
            let mut first = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let one = std::slice::from_ref(item);
                first.extend(eval(proj, one, &ctx.with_this(one, i))?);
            }
            repeat(first, |item, i| {
                let one = std::slice::from_ref(item);
                eval(proj, one, &ctx.with_this(one, i))
            })
        }
        Func::Aggregate => {
            let Some(agg) = args.first() else {
                return Ok(Vec::new());
            };
            let mut total = match args.get(1) {
                Some(init) => eval(init, ctx.this, ctx)?,
                None => Vec::new(),
            };
            for (i, item) in items.iter().enumerate() {
                let one = std::slice::from_ref(item);
                let c = Ctx {
                    env: ctx.env,
                    this: one,
                    index: Some(i),
                    total: Some(&total),
                    budget: ctx.budget,
                };
                total = eval(agg, one, &c)?;
            }
            Ok(total)
        }
        Func::Today | Func::Now | Func::TimeOfDay => Ok(vec![clock(func)]),
        Func::OfType(ty) | Func::As(ty) => {
            Ok(items.iter().filter_map(|i| as_type(i, ty)).collect())
        }
        Func::Is(ty) => match singleton(&items, "is()")? {
            None => Ok(Vec::new()),
            Some(i) => bool_out(is_type(i, ty)),
        },
        Func::Single => Ok(singleton(&items, "single()")?
            .cloned()
            .into_iter()
            .collect()),
        Func::First => Ok(items.into_iter().take(1).collect()),
        Func::Last => Ok(items.last().cloned().into_iter().collect()),
        Func::Tail => Ok(items.into_iter().skip(1).collect()),
        Func::Skip | Func::Take => {
            let n = int_arg(&arg(0)?, "the count")?;
            let Some(n) = n else {
                return Ok(Vec::new());
            };
            let n = usize::try_from(n.max(0)).unwrap_or(usize::MAX);
            Ok(if *func == Func::Skip {
                items.into_iter().skip(n).collect()
            } else {
                items.into_iter().take(n).collect()
            })
        }
        Func::Intersect => {
            let other = arg(0)?;
            let kept: Vec<Item<'a>> = items
                .into_iter()
                .filter(|i| other.iter().any(|o| items_equal(i, o)))
                .collect();
            Ok(distinct(kept))
        }
        Func::Exclude => {
            let other = arg(0)?;
            Ok(items
                .into_iter()
                .filter(|i| !other.iter().any(|o| items_equal(i, o)))
                .collect())
        }
        Func::Union => {
            let mut all = items;
            all.extend(arg(0)?);
            Ok(distinct(all))
        }
        Func::Combine => {
            let mut all = items;
            all.extend(arg(0)?);
            Ok(all)
        }
        Func::Iif => {
            // The criterion and branches see the function's input as `$this`.
            let c = Ctx {
                env: ctx.env,
                this: &items,
                index: ctx.index,
                total: ctx.total,
                budget: ctx.budget,
            };
            let node = |i: usize| args.get(i);
            let cond = match node(0) {
                Some(n) => to_bool(&eval(n, &items, &c)?, "iif()")?,
                None => None,
            };
            let branch = if cond == Some(true) { node(1) } else { node(2) };
            match branch {
                Some(n) => eval(n, &items, &c),
                None => Ok(Vec::new()),
            }
        }
        Func::ToBoolean | Func::ConvertsToBoolean => {
            convert(func, &items, *func == Func::ConvertsToBoolean, to_boolean)
        }
        Func::ToInteger | Func::ConvertsToInteger => {
            convert(func, &items, *func == Func::ConvertsToInteger, to_integer)
        }
        Func::ToDecimal | Func::ConvertsToDecimal => {
            convert(func, &items, *func == Func::ConvertsToDecimal, to_decimal)
        }
        Func::ToString | Func::ConvertsToString => {
            convert(func, &items, *func == Func::ConvertsToString, |i| {
                i.primitive_text().map(Item::String)
            })
        }
        Func::ToDate | Func::ConvertsToDate => {
            convert(func, &items, *func == Func::ConvertsToDate, |i| {
                to_temporal(i, TemporalKind::Date)
            })
        }
        Func::ToDateTime | Func::ConvertsToDateTime => {
            convert(func, &items, *func == Func::ConvertsToDateTime, |i| {
                to_temporal(i, TemporalKind::DateTime)
            })
        }
        Func::ToTime | Func::ConvertsToTime => {
            convert(func, &items, *func == Func::ConvertsToTime, |i| {
                to_temporal(i, TemporalKind::Time)
            })
        }
        Func::IndexOf
        | Func::Substring
        | Func::StartsWith
        | Func::EndsWith
        | Func::ContainsStr
        | Func::Upper
        | Func::Lower
        | Func::Replace
        | Func::Length
        | Func::Trim
        | Func::Split
        | Func::ToChars => string_fn(func, &items, args.len(), &arg),
        Func::Matches { full, regex } => {
            let Some(s) = input_string(&items, func.name())? else {
                return Ok(Vec::new());
            };
            let Some(re) = regex_arg(regex.as_deref(), &arg(0)?, *full)? else {
                return Ok(Vec::new());
            };
            bool_out(if *full {
                re.is_full_match(&s)
            } else {
                re.is_match(&s)
            })
        }
        Func::ReplaceMatches(regex) => {
            let Some(s) = input_string(&items, func.name())? else {
                return Ok(Vec::new());
            };
            let Some(re) = regex_arg(regex.as_deref(), &arg(0)?, false)? else {
                return Ok(Vec::new());
            };
            let Some(with) = string_arg(&arg(1)?, "replaceMatches() substitution")? else {
                return Ok(Vec::new());
            };
            Ok(vec![Item::String(Cow::Owned(re.replace_all(&s, &with)))])
        }
        Func::Join => {
            if items.is_empty() {
                return Ok(Vec::new());
            }
            let sep = match singleton(&arg(0)?, "join() separator")? {
                Some(s) => s
                    .primitive_text()
                    .ok_or_else(|| EvalError::Type("join() separator must be a string".into()))?,
                None => Cow::Borrowed(""),
            };
            let mut parts = Vec::with_capacity(items.len());
            for i in &items {
                parts.push(
                    i.primitive_text()
                        .ok_or_else(|| EvalError::Type("join() expects strings".into()))?,
                );
            }
            Ok(vec![Item::String(Cow::Owned(parts.join(sep.as_ref())))])
        }
        Func::Abs | Func::Ceiling | Func::Floor | Func::Round | Func::Truncate => {
            math_fn(func, &items, &arg)
        }
        Func::Children => {
            let mut out = Vec::new();
            for i in &items {
                children(i, &mut out);
            }
            Ok(out)
        }
        Func::Descendants => {
            let mut first = Vec::new();
            for i in &items {
                children(i, &mut first);
            }
            repeat(first, |item, _| {
                let mut out = Vec::new();
                children(item, &mut out);
                Ok(out)
            })
        }
        Func::Not => Ok(to_bool(&items, "not()")?
            .map(|b| Item::Boolean(!b))
            .into_iter()
            .collect()),
        Func::HasValue => bool_out(match items.as_slice() {
            [Item::Json { value, .. }] => {
                !matches!(json_ref(value), JsonRef::Object(_) | JsonRef::Array(_))
            }
            [_] => true,
            _ => false,
        }),
        Func::Trace => Ok(items),
        Func::LowBoundary | Func::HighBoundary => {
            let high = *func == Func::HighBoundary;
            let precision = int_arg(&arg(0)?, "the precision")?;
            let mut out = Vec::new();
            for i in &items {
                if let Some(Val::BigDec(text)) = val(i) {
                    return Err(too_big(&format!("{}()", func.name()), text));
                }
                out.extend(boundary(i, high, precision));
            }
            Ok(out)
        }
        Func::Extension => {
            let url = arg(0)?;
            let Some(url) = singleton(&url, "extension() url")? else {
                return Ok(Vec::new());
            };
            let url = url
                .primitive_text()
                .ok_or_else(|| EvalError::Type("extension() url must be a string".into()))?;
            let mut exts = Vec::new();
            for i in &items {
                navigate(i, "extension", &mut exts);
            }
            Ok(exts
                .into_iter()
                .filter(|e| match e {
                    Item::Json { value, .. } => member_str(value, "url") == Some(url.as_ref()),
                    _ => false,
                })
                .map(|e| match e {
                    Item::Json { value, .. } => Item::Json {
                        value,
                        fhir_type: Some("Extension"),
                    },
                    other => other,
                })
                .collect())
        }
        Func::GetResourceKey => {
            let mut out = Vec::new();
            resource_keys(&items, ctx.env, &mut out);
            Ok(out)
        }
        Func::GetReferenceKey(ty) => Ok(items
            .iter()
            .filter_map(|i| reference_key(i, ty.as_deref()))
            .map(|id| Item::String(Cow::Borrowed(id)))
            .collect()),
    }
}

/// `getResourceKey()`: the `id` of each resource in `items`, or of the environment's resource
/// when `items` holds none (e.g. inside a `forEach`).
pub(crate) fn resource_keys<'a>(items: &[Item<'a>], env: &Env<'a>, out: &mut Vec<Item<'a>>) {
    let mut any_resource = false;
    for i in items {
        if let Item::Json { value, .. } = i
            && member_str(value, "resourceType").is_some()
        {
            any_resource = true;
            if let Some(id) = member_str(value, "id") {
                out.push(Item::String(Cow::Borrowed(id)));
            }
        }
    }
    if !any_resource && let Some(id) = member_str(env.resource, "id") {
        out.push(Item::String(Cow::Borrowed(id)));
    }
}

/// `today()`, `now()`, `timeOfDay()` from the system clock, in UTC.
fn clock(func: &Func) -> Item<'static> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = i64::try_from(now.as_secs()).unwrap_or(0);
    let millis = now.subsec_millis();
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    let (h, mi, s) = (sod / 3600, sod % 3600 / 60, sod % 60);
    match func {
        Func::Today => Item::Date(Cow::Owned(format!("{y:04}-{m:02}-{d:02}"))),
        Func::TimeOfDay => Item::Time(Cow::Owned(format!("{h:02}:{mi:02}:{s:02}.{millis:03}"))),
        _ => Item::DateTime(Cow::Owned(format!(
            "{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{millis:03}Z"
        ))),
    }
}

/// Items of `items` for which `crit` is true (`where`).
fn filter<'a>(items: &[Item<'a>], crit: &Node, ctx: &Ctx<'_, 'a>) -> EvalResult<Vec<Item<'a>>> {
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let one = std::slice::from_ref(item);
        let c = ctx.with_this(one, i);
        if to_bool(&eval(crit, one, &c)?, "where() criteria")? == Some(true) {
            out.push(item.clone());
        }
    }
    Ok(out)
}

/// Collect `start` and everything `step` reaches from it, repeatedly, every item once (JSON
/// nodes by identity, computed values by equality).
fn repeat<'a>(
    start: Vec<Item<'a>>,
    mut step: impl FnMut(&Item<'a>, usize) -> EvalResult<Vec<Item<'a>>>,
) -> EvalResult<Vec<Item<'a>>> {
    let mut out: Vec<Item<'a>> = Vec::new();
    let mut seen_nodes: HashSet<(usize, u32)> = HashSet::new();
    let mut seen_values: Vec<Item<'a>> = Vec::new();
    let mut queue = start;
    let mut next_index = 0;
    while !queue.is_empty() {
        for item in queue {
            let fresh = match &item {
                Item::Json { value, .. } => seen_nodes.insert(value.identity()),
                other => {
                    let new = !seen_values.iter().any(|o| items_equal(o, other));
                    if new {
                        seen_values.push(other.clone());
                    }
                    new
                }
            };
            if !fresh {
                continue;
            }
            out.push(item);
            if out.len() > MAX_REPEAT_ITEMS {
                return Err(EvalError::Eval(format!(
                    "repeat() produced more than {MAX_REPEAT_ITEMS} items"
                )));
            }
        }
        let mut next = Vec::new();
        for (i, item) in out.iter().enumerate().skip(next_index) {
            next.extend(step(item, i)?);
        }
        next_index = out.len();
        queue = next;
    }
    Ok(out)
}

fn distinct(items: Vec<Item<'_>>) -> Vec<Item<'_>> {
    let mut out: Vec<Item<'_>> = Vec::with_capacity(items.len());
    for item in items {
        if !out.iter().any(|o| items_equal(o, &item)) {
            out.push(item);
        }
    }
    out
}

fn int_arg(items: &[Item<'_>], what: &str) -> EvalResult<Option<i64>> {
    match singleton(items, what)? {
        None => Ok(None),
        Some(i) => match val(i) {
            Some(Val::Int(n)) => Ok(Some(n)),
            _ => Err(EvalError::Type(format!("{what} must be an integer"))),
        },
    }
}

fn convert<'a>(
    func: &Func,
    items: &[Item<'a>],
    test_only: bool,
    f: impl Fn(&Item<'a>) -> Option<Item<'a>>,
) -> EvalResult<Vec<Item<'a>>> {
    let name = func.name();
    let Some(item) = singleton(items, name)? else {
        return Ok(Vec::new());
    };
    let r = f(item);
    Ok(if test_only {
        vec![Item::Boolean(r.is_some())]
    } else {
        r.into_iter().collect()
    })
}

fn to_boolean<'a>(item: &Item<'a>) -> Option<Item<'a>> {
    let b = match val(item)? {
        Val::Bool(b) => b,
        Val::Int(1) => true,
        Val::Int(0) => false,
        Val::Dec(d) => match d.to_i64_exact() {
            Some(1) => true,
            Some(0) => false,
            _ => return None,
        },
        Val::Str(s) => match s.to_ascii_lowercase().as_str() {
            "true" | "t" | "yes" | "y" | "1" | "1.0" => true,
            "false" | "f" | "no" | "n" | "0" | "0.0" => false,
            _ => return None,
        },
        _ => return None,
    };
    Some(Item::Boolean(b))
}

fn is_integer_text(s: &str) -> bool {
    let d = s.strip_prefix(['+', '-']).unwrap_or(s);
    !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit())
}

fn to_integer<'a>(item: &Item<'a>) -> Option<Item<'a>> {
    match val(item)? {
        Val::Int(i) => Some(Item::Integer(i)),
        Val::Bool(b) => Some(Item::Integer(i64::from(b))),
        Val::Str(s) if is_integer_text(s) => s.parse().ok().map(Item::Integer),
        _ => None,
    }
}

fn to_decimal<'a>(item: &Item<'a>) -> Option<Item<'a>> {
    let d = match val(item)? {
        Val::Int(i) => Decimal::from_i64(i),
        Val::Dec(d) => d,
        Val::Bool(b) => Decimal {
            mantissa: i128::from(b) * 10,
            scale: 1,
        },
        Val::Str(s) if !s.contains(['e', 'E']) => Decimal::parse(s)?,
        // Too large to compute with, but still the decimal it was.
        Val::BigDec(_) => return item.primitive_text().map(Item::Decimal),
        _ => return None,
    };
    Some(decimal_item(d))
}

/// `toDate()`, `toDateTime()`, `toTime()`: strings in the target's lexical form convert; a date
/// converts to a dateTime and a dateTime to its date part.
///
/// An element of the input whose type is unknown (`authoredOn`, `issued`: JSON has no types,
/// see the module docs) and whose text is a dateTime with a time is taken as the FHIR
/// `dateTime` or `instant` it is, so `authoredOn.toDate()` is its date. A string computed in
/// the expression (`'2020-05-01T10:00:00Z'.toDate()`) is not: FHIRPath converts only
/// `YYYY-MM-DD` strings to dates.
fn to_temporal<'a>(item: &Item<'a>, kind: TemporalKind) -> Option<Item<'a>> {
    let untyped_date_time = |s: &str| {
        matches!(
            item,
            Item::Json {
                fhir_type: None,
                ..
            }
        ) && s.contains('T')
            && Temporal::parse(s, TemporalKind::DateTime).is_some()
    };
    let text = match (val(item)?, kind) {
        (Val::Str(s), TemporalKind::Date) if untyped_date_time(s) => date_part(item)?,
        (Val::Str(_) | Val::Date(_), TemporalKind::Date | TemporalKind::DateTime)
        | (Val::DateTime(_), TemporalKind::DateTime)
        | (Val::Str(_) | Val::Time(_), TemporalKind::Time) => item.primitive_text()?,
        (Val::DateTime(_), TemporalKind::Date) => date_part(item)?,
        _ => return None,
    };
    Temporal::parse(&text, kind)?;
    Some(match kind {
        TemporalKind::Date => Item::Date(text),
        TemporalKind::DateTime => Item::DateTime(text),
        TemporalKind::Time => Item::Time(text),
    })
}

/// The text of a dateTime up to its `T`.
fn date_part<'a>(item: &Item<'a>) -> Option<Cow<'a, str>> {
    let t = item.primitive_text()?;
    let date_len = t.find('T').unwrap_or(t.len());
    Some(match t {
        Cow::Borrowed(b) => Cow::Borrowed(&b[..date_len]),
        Cow::Owned(o) => Cow::Owned(o[..date_len].to_string()),
    })
}

/// The regex of `matches()`/`matchesFull()` (`full`)/`replaceMatches()`: precompiled, or
/// compiled from the argument.
fn regex_arg<'r>(
    pre: Option<&'r Regex>,
    arg: &[Item<'_>],
    full: bool,
) -> EvalResult<Option<Cow<'r, Regex>>> {
    if let Some(r) = pre {
        return Ok(Some(Cow::Borrowed(r)));
    }
    match string_arg(arg, "the regular expression")? {
        None => Ok(None),
        Some(p) => if full {
            Regex::new_full(&p)
        } else {
            Regex::new(&p)
        }
        .map(|r| Some(Cow::Owned(r)))
        .map_err(EvalError::Eval),
    }
}

/// String-valued input of a string function: empty for an empty input.
fn input_string<'a>(items: &[Item<'a>], what: &str) -> EvalResult<Option<Cow<'a, str>>> {
    match singleton(items, what)? {
        None => Ok(None),
        Some(i) => match val(i) {
            Some(Val::Str(_) | Val::Date(_) | Val::DateTime(_) | Val::Time(_)) => {
                Ok(i.primitive_text())
            }
            _ => Err(EvalError::Type(format!("{what} expects a string input"))),
        },
    }
}

fn string_arg(items: &[Item<'_>], what: &str) -> EvalResult<Option<String>> {
    match singleton(items, what)? {
        None => Ok(None),
        Some(i) => i
            .primitive_text()
            .map(|c| Some(c.into_owned()))
            .ok_or_else(|| EvalError::Type(format!("{what} must be a string"))),
    }
}

fn string_fn<'a>(
    func: &Func,
    items: &[Item<'a>],
    nargs: usize,
    arg: &dyn Fn(usize) -> EvalResult<Vec<Item<'a>>>,
) -> EvalResult<Vec<Item<'a>>> {
    let name = func.name();
    let Some(s) = input_string(items, name)? else {
        return Ok(Vec::new());
    };
    let str_item = |x: String| Item::String(Cow::Owned(x));
    let out = match func {
        Func::Upper => Some(str_item(s.to_uppercase())),
        Func::Lower => Some(str_item(s.to_lowercase())),
        Func::Trim => Some(str_item(s.trim().to_string())),
        Func::Length => Some(Item::Integer(
            i64::try_from(s.chars().count()).unwrap_or(i64::MAX),
        )),
        Func::ToChars => {
            return Ok(s.chars().map(|c| str_item(c.to_string())).collect());
        }
        Func::StartsWith | Func::EndsWith | Func::ContainsStr | Func::IndexOf | Func::Split => {
            let Some(a) = string_arg(&arg(0)?, name)? else {
                return Ok(Vec::new());
            };
            match func {
                Func::StartsWith => Some(Item::Boolean(s.starts_with(a.as_str()))),
                Func::EndsWith => Some(Item::Boolean(s.ends_with(a.as_str()))),
                Func::ContainsStr => Some(Item::Boolean(s.contains(a.as_str()))),
                Func::IndexOf => Some(Item::Integer(match s.find(a.as_str()) {
                    Some(b) => i64::try_from(s[..b].chars().count()).unwrap_or(i64::MAX),
                    None => -1,
                })),
                _ => {
                    return Ok(s
                        .split(a.as_str())
                        .map(|p| str_item(p.to_string()))
                        .collect());
                }
            }
        }
        Func::Replace => {
            let (Some(pat), Some(rep)) = (string_arg(&arg(0)?, name)?, string_arg(&arg(1)?, name)?)
            else {
                return Ok(Vec::new());
            };
            Some(str_item(s.replace(pat.as_str(), &rep)))
        }
        Func::Substring => {
            let Some(start) = int_arg(&arg(0)?, "substring() start")? else {
                return Ok(Vec::new());
            };
            let len = if nargs > 1 {
                int_arg(&arg(1)?, "substring() length")?
            } else {
                None
            };
            let count = i64::try_from(s.chars().count()).unwrap_or(i64::MAX);
            if start < 0 || start >= count {
                return Ok(Vec::new());
            }
            let skip = usize::try_from(start).unwrap_or(usize::MAX);
            let text: String = match len {
                Some(l) => s
                    .chars()
                    .skip(skip)
                    .take(usize::try_from(l.max(0)).unwrap_or(usize::MAX))
                    .collect(),
                None => s.chars().skip(skip).collect(),
            };
            Some(str_item(text))
        }
        _ => None,
    };
    Ok(out.into_iter().collect())
}

fn math_fn<'a>(
    func: &Func,
    items: &[Item<'a>],
    arg: &dyn Fn(usize) -> EvalResult<Vec<Item<'a>>>,
) -> EvalResult<Vec<Item<'a>>> {
    let name = func.name();
    let Some(item) = singleton(items, name)? else {
        return Ok(Vec::new());
    };
    let out = match val(item) {
        Some(Val::Int(i)) => match func {
            Func::Abs => i.checked_abs().map(Item::Integer),
            Func::Round => Some(decimal_item(Decimal::from_i64(i))),
            _ => Some(Item::Integer(i)),
        },
        Some(Val::Dec(d)) => match func {
            Func::Abs => d.mantissa.checked_abs().map(|mantissa| {
                decimal_item(Decimal {
                    mantissa,
                    scale: d.scale,
                })
            }),
            Func::Ceiling | Func::Floor => d
                .floor_ceil_to(0, *func == Func::Ceiling)
                .to_i64_exact()
                .map(Item::Integer),
            Func::Truncate => d.trunc_i64().map(Item::Integer),
            _ => {
                let p = int_arg(&arg(0)?, "round() precision")?.unwrap_or(0);
                let p = u32::try_from(p)
                    .map_err(|_| EvalError::Eval("round() precision must be >= 0".into()))?;
                Some(decimal_item(d.round_to(p)))
            }
        },
        Some(Val::BigDec(text)) => return Err(too_big(&format!("{name}()"), text)),
        _ => return Err(EvalError::Type(format!("{name} expects a number"))),
    };
    Ok(out.into_iter().collect())
}

/// Children of a node: every property value (arrays flattened; choice elements typed).
fn children<'a>(item: &Item<'a>, out: &mut Vec<Item<'a>>) {
    if let Item::Json { value, .. } = item
        && let JsonRef::Object(m) = json_ref(value)
    {
        for (k, v) in m {
            if k == "resourceType" || k.starts_with('_') {
                continue;
            }
            // A choice key like `valueQuantity` carries its type.
            let ty = k
                .char_indices()
                .find(|(_, c)| c.is_ascii_uppercase())
                .and_then(|(i, _)| choice_suffix_type(&k[i..]));
            match json_ref(v) {
                JsonRef::Null => {}
                JsonRef::Array(a) => out.extend(
                    a.iter()
                        .filter(|x| !matches!(json_ref(x), JsonRef::Null))
                        .map(|value| Item::Json {
                            value,
                            fhir_type: ty,
                        }),
                ),
                _ => out.push(Item::Json {
                    value: v,
                    fhir_type: ty,
                }),
            }
        }
    }
}

/// `lowBoundary()`/`highBoundary()` of one item.
fn boundary<'a>(item: &Item<'a>, high: bool, precision: Option<i64>) -> Option<Item<'a>> {
    let owned = |s: String| Cow::Owned(s);
    match val(item)? {
        Val::Int(i) => decimal_boundary(Decimal::from_i64(i), high, precision),
        Val::Dec(d) => decimal_boundary(d, high, precision),
        Val::Date(s) => {
            Temporal::parse(s, TemporalKind::Date).map(|t| Item::Date(owned(t.boundary(high))))
        }
        Val::DateTime(s) => Temporal::parse(s, TemporalKind::DateTime)
            .map(|t| Item::DateTime(owned(t.boundary(high)))),
        Val::Time(s) => {
            Temporal::parse(s, TemporalKind::Time).map(|t| Item::Time(owned(t.boundary(high))))
        }
        // An untyped JSON string: infer the kind from its form.
        Val::Str(s) => {
            if let Some(t) = Temporal::parse(s, TemporalKind::Date) {
                Some(Item::Date(owned(t.boundary(high))))
            } else if let Some(t) = Temporal::parse(s, TemporalKind::DateTime) {
                Some(Item::DateTime(owned(t.boundary(high))))
            } else {
                Temporal::parse(s, TemporalKind::Time).map(|t| Item::Time(owned(t.boundary(high))))
            }
        }
        // A Period: low boundary of `start`, high boundary of `end`.
        Val::Node(node) => {
            let v = member_str(node, if high { "end" } else { "start" })?;
            Temporal::parse(v, TemporalKind::DateTime)
                .map(|t| Item::DateTime(owned(t.boundary(high))))
        }
        _ => None,
    }
}

/// The decimal boundary: the value ± half a unit in the last written digit, e.g. `1.0` ->
/// `0.95`/`1.05`. With a precision, the result is widened or rounded outward to that many
/// fraction digits.
fn decimal_boundary<'a>(d: Decimal, high: bool, precision: Option<i64>) -> Option<Item<'a>> {
    let scale = d.scale + 1;
    let base = d.with_min_scale(scale)?;
    let half = Decimal { mantissa: 5, scale };
    let b = if high {
        base.add(half)?
    } else {
        base.sub(half)?
    };
    let b = match precision {
        None => b,
        Some(p) => {
            let p = u32::try_from(p).ok().filter(|p| *p <= 28)?;
            if p >= scale {
                b.with_min_scale(p)?
            } else {
                b.floor_ceil_to(p, high)
            }
        }
    };
    Some(decimal_item(b))
}

/// The id in a literal reference (`Type/id`, `.../Type/id`, `Type/id/_history/v`), when its
/// type matches `ty`.
pub(crate) fn reference_key<'a>(item: &Item<'a>, ty: Option<&str>) -> Option<&'a str> {
    parse_reference(item)?.key(ty)
}

/// A literal reference split into its type and id (see [`parse_reference`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ParsedReference<'a> {
    /// The resource type (`Patient`); `None` for a `urn:uuid:` reference, which has none.
    pub rtype: Option<&'a str>,
    /// The id (`123`).
    pub id: &'a str,
}

impl<'a> ParsedReference<'a> {
    /// The id when the type matches `ty` (any type for `None`). An untyped (`urn:uuid:`)
    /// reference matches every `ty`: nothing in it says which type it points at.
    #[inline]
    pub(crate) fn key(self, ty: Option<&str>) -> Option<&'a str> {
        match (ty, self.rtype) {
            (Some(t), Some(rtype)) if !bytes_eq(t.as_bytes(), rtype.as_bytes()) => None,
            _ => Some(self.id),
        }
    }
}

/// The `urn:uuid:` scheme prefix (matched ASCII case-insensitively, as URN schemes are).
const URN_UUID: &[u8] = b"urn:uuid:";

/// The type and id of the literal reference `item` holds (a `Reference` object's `reference`,
/// or the string itself):
///
/// * `[...]/Type/id[/_history/v]` with a FHIR type name and id gives `Type` and `id`;
/// * `urn:uuid:<id>` (how Synthea's bundles and some servers' exports point at a resource
///   whose id is that uuid) gives `<id>` and no type, when `<id>` is a FHIR id
///   (`[A-Za-z0-9\-\.]{1,64}`, which every uuid is);
/// * contained (`#x`), other `urn:` (`urn:oid:`) and any other form give `None`.
pub(crate) fn parse_reference<'a>(item: &Item<'a>) -> Option<ParsedReference<'a>> {
    let reference = match item {
        Item::Json { value, .. } => match json_ref(value) {
            JsonRef::Object(_) => member_str(value, "reference")?,
            JsonRef::String(s) => s,
            _ => return None,
        },
        _ => return None,
    };
    if reference.starts_with('#') {
        return None;
    }
    if reference
        .as_bytes()
        .get(..URN_UUID.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(URN_UUID))
    {
        let id = reference.get(URN_UUID.len()..)?;
        let valid = (1..=64).contains(&id.len()) && all_id_bytes(id.as_bytes());
        return valid.then_some(ParsedReference { rtype: None, id });
    }
    if reference.starts_with("urn:") {
        return None;
    }
    let bytes = reference.as_bytes();
    let (type_start, slash, end) = match last_two_segments(bytes) {
        Some((t, slash)) if !bytes[..t].contains(&b'_') => (t, slash, bytes.len()),
        _ => {
            // A version (`/_history/`) or a malformed reference: the general path.
            let end = reference.find("/_history/").unwrap_or(bytes.len());
            let slash = memchr::memrchr(b'/', &bytes[..end])?;
            let type_start = memchr::memrchr(b'/', &bytes[..slash]).map_or(0, |i| i + 1);
            let valid = bytes[type_start..slash]
                .iter()
                .all(u8::is_ascii_alphanumeric)
                && all_id_bytes(&bytes[slash + 1..end]);
            if !valid {
                return None;
            }
            (type_start, slash, end)
        }
    };
    let id_len = end - slash - 1;
    if !bytes[type_start..slash]
        .first()
        .is_some_and(u8::is_ascii_uppercase)
        || id_len == 0
        || id_len > 64
    {
        return None;
    }
    Some(ParsedReference {
        rtype: Some(reference.get(type_start..slash)?),
        id: reference.get(slash + 1..end)?,
    })
}

/// A byte of a FHIR id (`[A-Za-z0-9\-\.]`): the oracle of [`all_id_bytes`].
#[cfg(test)]
fn is_id_byte(b: u8) -> bool {
    BYTE_CLASS[b as usize] & ID_BYTE != 0
}

/// Whether every byte of `bytes` is [`is_id_byte`]: the classes of eight bytes at a time are
/// and-ed without a branch per byte (ids are short; a uuid is 36 bytes).
fn all_id_bytes(bytes: &[u8]) -> bool {
    let mut chunks = bytes.chunks_exact(8);
    let mut acc = ID_BYTE;
    for c in &mut chunks {
        let mut k = ID_BYTE;
        for &b in c {
            k &= BYTE_CLASS[b as usize];
        }
        acc &= k;
        if acc == 0 {
            return false;
        }
    }
    for &b in chunks.remainder() {
        acc &= BYTE_CLASS[b as usize];
    }
    acc & ID_BYTE != 0
}

/// A byte of a resource type name (`[A-Za-z0-9]`).
fn is_type_byte(b: u8) -> bool {
    BYTE_CLASS[b as usize] & TYPE_BYTE != 0
}

const ID_BYTE: u8 = 1;
const TYPE_BYTE: u8 = 2;

/// [`ID_BYTE`] and [`TYPE_BYTE`] flags per byte value: one load per byte in the scans of
/// references, which run for several columns of nearly every resource.
static BYTE_CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        if c.is_ascii_alphanumeric() {
            t[b] = ID_BYTE | TYPE_BYTE;
        } else if c == b'-' || c == b'.' {
            t[b] = ID_BYTE;
        }
        b += 1;
    }
    t
};

/// `(type start, slash)` of a reference ending in `[.../]Type/id`, found in one backward pass
/// over the id's and the type's bytes (which it checks): `None` when the last segment has a
/// byte no id has, or the one before it a non-alphanumeric byte.
fn last_two_segments(bytes: &[u8]) -> Option<(usize, usize)> {
    // The last `/` (found a word at a time), then every byte after it an id byte: the same as
    // walking back over id bytes to a `/`, since `/` is not one.
    let slash = memchr::memrchr(b'/', bytes)?;
    if !all_id_bytes(&bytes[slash + 1..]) {
        return None;
    }
    let mut t = slash;
    while t > 0 && is_type_byte(bytes[t - 1]) {
        t -= 1;
    }
    (t == 0 || bytes[t - 1] == b'/').then_some((t, slash))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The straightforward reading of a reference, the oracle for [`reference_key`]'s scans.
    fn reference_key_oracle<'a>(reference: &'a str, ty: Option<&str>) -> Option<&'a str> {
        if let Some(id) = reference
            .get(..9)
            .filter(|p| p.eq_ignore_ascii_case("urn:uuid:"))
            .map(|_| &reference[9..])
        {
            let valid = (1..=64).contains(&id.len()) && id.bytes().all(is_id_byte);
            return valid.then_some(id);
        }
        if reference.starts_with('#') || reference.starts_with("urn:") {
            return None;
        }
        let end = reference.find("/_history/").unwrap_or(reference.len());
        let (rest, id) = reference[..end].rsplit_once('/')?;
        let rtype = rest.rsplit('/').next().unwrap_or(rest);
        let valid = rtype.starts_with(|c: char| c.is_ascii_uppercase())
            && rtype.bytes().all(|b| b.is_ascii_alphanumeric())
            && (1..=64).contains(&id.len())
            && id.bytes().all(is_id_byte)
            && ty.is_none_or(|t| t == rtype);
        valid.then_some(id)
    }

    proptest::proptest! {
        #[test]
        fn reference_key_matches_oracle(
            r in "((urn:uuid:|URN:UUID:|urn:oid:)[a-f0-9./_-]{0,5})|((http://[a-z_]{1,3}/)?[A-Pa-p]{0,3}(/[A-Pa-p0-9._#:-]{0,4}){0,3}(/_history/[0-9]?)?)",
        ) {
            let v = crate::view::json::json_doc!({ "reference": r });
            for ty in [None, Some("P"), Some("Pa")] {
                proptest::prop_assert_eq!(
                    reference_key(&Item::json(v), ty),
                    reference_key_oracle(&r, ty),
                    "{} {:?}", r, ty
                );
            }
        }
    }

    /// The word-at-a-time id check agrees with the byte-by-byte one at every length and
    /// position of a bad byte (the chunks and the remainder), and so do long references.
    #[test]
    fn all_id_bytes_matches_bytewise() {
        let bad = [b'/', b'_', b' ', b':', b'#', b'+', 0x80, 0xff, 0, b'{'];
        for len in 0..=72usize {
            let good: Vec<u8> = (0..len)
                .map(|i| b"0123456789abcdefABCXYZxyz-."[i % 27])
                .collect();
            assert!(all_id_bytes(&good), "{len}");
            for at in 0..len {
                for &b in &bad {
                    let mut v = good.clone();
                    v[at] = b;
                    assert_eq!(all_id_bytes(&v), v.iter().all(|&b| is_id_byte(b)));
                    assert!(!all_id_bytes(&v), "{len} {at} {b}");
                }
            }
            if let Ok(id) = std::str::from_utf8(&good) {
                for r in [
                    format!("Patient/{id}"),
                    format!("http://x/fhir/Patient/{id}"),
                    format!("Patient/{id}/_history/2"),
                    format!("urn:uuid:{id}"),
                    format!("Pat_ient/{id}"),
                    format!("Patient/{id}_"),
                    format!("Patient/{id}/"),
                    format!("Patient/{id}:x"),
                    format!("Patient/{id}é"),
                ] {
                    let v = crate::view::json::json_doc!({ "reference": r });
                    for ty in [None, Some("Patient"), Some("Group")] {
                        assert_eq!(
                            reference_key(&Item::json(v), ty),
                            reference_key_oracle(&r, ty),
                            "{r} {ty:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn reference_keys() {
        let cases = [
            ("Patient/123", None, Some("123")),
            ("Patient/123", Some("Patient"), Some("123")),
            ("Patient/123", Some("Observation"), None),
            ("http://x.org/fhir/Patient/a-1", None, Some("a-1")),
            ("Patient/123/_history/2", None, Some("123")),
            ("#contained", None, None),
            ("urn:uuid:1234", None, Some("1234")),
            (
                "urn:uuid:4b1c7d0e-2a3f-4e5b-9c6d-7e8f9a0b1c2d",
                Some("Condition"),
                Some("4b1c7d0e-2a3f-4e5b-9c6d-7e8f9a0b1c2d"),
            ),
            ("urn:uuid:1234", Some("Patient"), Some("1234")),
            ("URN:UUID:AB-12", Some("Patient"), Some("AB-12")),
            ("urn:uuid:", None, None),
            ("urn:uuid:a/b", None, None),
            ("urn:uuid:a_b", None, None),
            ("urn:oid:1.2.3", None, None),
            ("urn:uuidx", None, None),
            ("123", None, None),
            ("patient/123", None, None),
            ("Patient/", None, None),
            ("Patient/a_b", None, None),
            ("http://x_y.org/fhir/Patient/1", Some("Patient"), Some("1")),
            ("http://x.org/fhir/Patient/1/_history/2", None, Some("1")),
            ("Patient/1/_history/", None, Some("1")),
            ("x:Patient/1", None, None),
            ("/Patient/1", None, Some("1")),
        ];
        for (r, ty, want) in cases {
            let v = crate::view::json::json_doc!({ "reference": r });
            assert_eq!(reference_key(&Item::json(v), ty), want, "{r} {ty:?}");
        }
        let v = crate::view::json::json_doc!({"display": "x"});
        assert_eq!(reference_key(&Item::json(v), None), None);
    }

    #[test]
    fn decimal_boundaries() {
        let b = |s: &str, high, p| {
            decimal_boundary(Decimal::parse(s).expect("dec"), high, p)
                .and_then(|i| i.primitive_text().map(|c| c.into_owned()))
        };
        assert_eq!(b("1.0", false, None).as_deref(), Some("0.95"));
        assert_eq!(b("1.0", true, None).as_deref(), Some("1.05"));
        assert_eq!(b("1.587", false, None).as_deref(), Some("1.5865"));
        assert_eq!(b("1.587", true, None).as_deref(), Some("1.5875"));
        assert_eq!(b("-1.587", false, None).as_deref(), Some("-1.5875"));
        assert_eq!(b("1", false, None).as_deref(), Some("0.5"));
        assert_eq!(b("1.587", false, Some(8)).as_deref(), Some("1.58650000"));
        assert_eq!(b("1.587", true, Some(2)).as_deref(), Some("1.59"));
        assert_eq!(b("1.587", false, Some(2)).as_deref(), Some("1.58"));
        assert_eq!(b("1.587", false, Some(-1)), None);
    }
}
