//! FHIR → Arrow type mapping and the conversion of FHIRPath results into typed cells.
//!
//! Without an `ansi/type` tag a column follows the SQL-on-FHIR default mapping: boolean →
//! Boolean, integer-like → Int32, everything else (decimal, date, dateTime, instant, time, string
//! types) → Utf8 in its FHIR lexical form, so nothing is lost. An `ansi/type` tag asks for a native
//! type, which cannot hold every valid FHIR value: FHIR decimals have arbitrary precision, times
//! have leap seconds and any number of fraction digits, and the date regexes admit `2021-02-30`.
//! A **valid value never costs its row**: it is stored as the nearest value the column holds, or
//! as null when there is none, and the conversion says so ([`Converted::exact`]), so the decoder
//! counts it ([`DecodeStats::inexact_cells`](crate::flatten::DecodeStats::inexact_cells)) rather
//! than rejecting the resource. The exact text is never lost: it stays in the raw `resource`
//! column, and for dates and times in the views' `_text` companion columns. Only a value that is
//! not valid FHIR for the column (text in a number column, `05/06/1970` in a date column, an
//! integer beyond 32 bits) fails, and the caller rejects the resource.
//!
//! * `DECIMAL(p,s)` — rounded to `s` fraction digits, **half away from zero** (`0.5` → `1`,
//!   `-2.5` → `-3`), as a SQL `CAST(text AS DECIMAL(p,s))` does in DataFusion, so the typed value
//!   agrees with a cast of the lexical text; null when the rounded value has more than `p`
//!   digits (`1e40` in `DECIMAL(38,18)`), whatever the exponent (`1e-99999999999` is `0`).
//! * `DOUBLE` — the nearest `f64` (approximate by choice, not counted); a value beyond the `f64`
//!   range (`1e400`) is null, and a non-zero value below it (`1e-400`) is `0`, both counted.
//! * `DATE` — a partial date (`2020`, `2020-05`) becomes the first day of that period; a dateTime
//!   keeps its date part as written (no time zone shift). A date the regex admits but the
//!   calendar lacks (`2021-02-30`) is null.
//! * `TIMESTAMP [WITH TIME ZONE]` — the instant in UTC microseconds; a value with an offset is
//!   converted to UTC (the same instant); a partial value or one without a time becomes the start
//!   of that period in UTC. Views that care keep the text in a companion column. Fraction digits
//!   past the microsecond are rounded half away from zero; a leap second (`23:59:60`) becomes
//!   the next minute's second 0, as POSIX time (which Arrow timestamps count) has no leap
//!   seconds. Both count as inexact; partial values and offsets do not (they are the documented
//!   mapping, and the `_text` column keeps them).
//! * `TIME` — microseconds since midnight, rounded as above; a leap second, or a value that
//!   rounds past `23:59:59.999999`, is clamped to `23:59:59.999999` (Time64 stops before 24:00).
//! * `BOOLEAN`, `INT`, `BIGINT` — exact: FHIR `integer`, `positiveInt` and `unsignedInt` are
//!   32-bit, and JSON (like FHIR's regexes) has no `+` sign or leading zeros.

use std::borrow::Cow;

use super::json::{JsonRef, json_ref, number_text, to_json_text};
use datafusion::arrow::datatypes::{DataType, TimeUnit};

use super::fhirpath::Item;

/// Arrow storage type of a column (before `collection` wraps it in a list).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    /// Utf8; FHIR lexical form, objects as JSON text.
    Utf8,
    /// Boolean.
    Boolean,
    /// Int32.
    Int32,
    /// Int64.
    Int64,
    /// Float64.
    Float64,
    /// Decimal128(precision, scale).
    Decimal(u8, i8),
    /// Date32 (days since 1970-01-01).
    Date32,
    /// Timestamp(µs); `true` when the type carries the "UTC" zone.
    Timestamp(bool),
    /// Time64(µs).
    Time64,
}

impl ColumnType {
    /// The default for a FHIR type code (SQL-on-FHIR default mapping).
    pub fn for_fhir_type(fhir_type: &str) -> ColumnType {
        match fhir_type {
            "boolean" => ColumnType::Boolean,
            "integer" | "positiveInt" | "unsignedInt" => ColumnType::Int32,
            "integer64" => ColumnType::Int64,
            _ => ColumnType::Utf8,
        }
    }

    /// Parse an `ansi/type` tag value.
    pub fn from_ansi(tag: &str) -> Option<ColumnType> {
        let t = tag.trim().to_ascii_uppercase();
        let t = t.split_whitespace().collect::<Vec<_>>().join(" ");
        Some(match t.as_str() {
            "BOOLEAN" | "BOOL" => ColumnType::Boolean,
            "INT" | "INTEGER" | "INT4" => ColumnType::Int32,
            "BIGINT" | "INT8" => ColumnType::Int64,
            "DOUBLE" | "DOUBLE PRECISION" | "FLOAT" | "FLOAT8" | "REAL" => ColumnType::Float64,
            "DATE" => ColumnType::Date32,
            "TIMESTAMP" | "TIMESTAMP WITHOUT TIME ZONE" => ColumnType::Timestamp(false),
            "TIMESTAMP WITH TIME ZONE" | "TIMESTAMPTZ" => ColumnType::Timestamp(true),
            "TIME" => ColumnType::Time64,
            "VARCHAR" | "CHARACTER VARYING" | "TEXT" | "STRING" => ColumnType::Utf8,
            _ => {
                let inner = t
                    .strip_prefix("DECIMAL")
                    .or_else(|| t.strip_prefix("NUMERIC"))?
                    .trim();
                let inner = inner.strip_prefix('(')?.strip_suffix(')')?;
                let (p, s) = inner.split_once(',')?;
                let p: u8 = p.trim().parse().ok()?;
                let s: i8 = s.trim().parse().ok()?;
                if !(1..=38).contains(&p) || s < 0 || s as u8 > p {
                    return None;
                }
                ColumnType::Decimal(p, s)
            }
        })
    }

    /// The Arrow data type.
    pub fn data_type(self) -> DataType {
        match self {
            ColumnType::Utf8 => DataType::Utf8,
            ColumnType::Boolean => DataType::Boolean,
            ColumnType::Int32 => DataType::Int32,
            ColumnType::Int64 => DataType::Int64,
            ColumnType::Float64 => DataType::Float64,
            ColumnType::Decimal(p, s) => DataType::Decimal128(p, s),
            ColumnType::Date32 => DataType::Date32,
            ColumnType::Timestamp(utc) => {
                DataType::Timestamp(TimeUnit::Microsecond, utc.then(|| "UTC".into()))
            }
            ColumnType::Time64 => DataType::Time64(TimeUnit::Microsecond),
        }
    }
}

/// One typed value of a row, ready to append to an Arrow builder.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell<'a> {
    /// No value.
    Null,
    /// Boolean.
    Bool(bool),
    /// Int32 or Int64.
    Int(i64),
    /// Float64.
    Float(f64),
    /// Decimal128 unscaled value.
    Decimal(i128),
    /// Utf8.
    Str(Cow<'a, str>),
    /// Date32.
    Date(i32),
    /// Timestamp µs.
    Timestamp(i64),
    /// Time64 µs.
    Time(i64),
    /// A `collection: true` column.
    List(Vec<Cell<'a>>),
}

impl Cell<'_> {
    /// `true` for the cells that own heap memory (a computed string, a list).
    #[inline]
    pub fn owns_memory(&self) -> bool {
        matches!(self, Cell::Str(Cow::Owned(_)) | Cell::List(_))
    }
}

/// Why a value does not fit its column.
pub type ConvertError = String;

/// How a valid value fits a native column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit<T> {
    /// The column holds the value exactly.
    Exact(T),
    /// The nearest value the column holds (rounded, or clamped to its range).
    Nearest(T),
    /// The column holds nothing near it (out of range, or a date the calendar lacks): null.
    Null,
}

impl<T> Fit<T> {
    /// The value when it is exact.
    pub fn exact(self) -> Option<T> {
        match self {
            Fit::Exact(v) => Some(v),
            _ => None,
        }
    }

    /// The value stored (exact or nearest), `None` for null.
    pub fn value(self) -> Option<T> {
        match self {
            Fit::Exact(v) | Fit::Nearest(v) => Some(v),
            Fit::Null => None,
        }
    }

    /// `Exact` when `exact`, else `Nearest`.
    fn new(v: T, exact: bool) -> Self {
        if exact {
            Fit::Exact(v)
        } else {
            Fit::Nearest(v)
        }
    }

    fn map<U>(self, f: impl FnOnce(T) -> U) -> Fit<U> {
        match self {
            Fit::Exact(v) => Fit::Exact(f(v)),
            Fit::Nearest(v) => Fit::Nearest(f(v)),
            Fit::Null => Fit::Null,
        }
    }
}

/// One item converted for its column.
#[derive(Debug, Clone, PartialEq)]
pub struct Converted<'a> {
    /// The cell to store.
    pub cell: Cell<'a>,
    /// `false` when the cell holds the nearest value the column can (or null) rather than the
    /// value itself (see the [module docs](self)).
    pub exact: bool,
}

impl<'a> From<Fit<Cell<'a>>> for Converted<'a> {
    fn from(f: Fit<Cell<'a>>) -> Self {
        match f {
            Fit::Exact(cell) => Converted { cell, exact: true },
            Fit::Nearest(cell) => Converted { cell, exact: false },
            Fit::Null => Converted {
                cell: Cell::Null,
                exact: false,
            },
        }
    }
}

/// Convert one FHIRPath item into a cell of type `ty`: exactly, as the nearest value the column
/// holds (or null), or — for a value that is not valid for the column — an error.
pub fn convert<'a>(item: &Item<'a>, ty: ColumnType) -> Result<Converted<'a>, ConvertError> {
    let exact = |cell| Converted { cell, exact: true };
    match ty {
        ColumnType::Utf8 => Ok(exact(Cell::Str(item_text(item)))),
        ColumnType::Boolean => match item {
            Item::Boolean(b) => Ok(exact(Cell::Bool(*b))),
            Item::Json { value, .. } if matches!(json_ref(value), JsonRef::Bool(_)) => Ok(exact(
                Cell::Bool(matches!(json_ref(value), JsonRef::Bool(true))),
            )),
            other => Err(format!("expected a boolean, got {}", describe(other))),
        },
        ColumnType::Int32 | ColumnType::Int64 => {
            let v: i64 = match item {
                Item::Integer(i) => *i,
                Item::Json { value, .. } if matches!(json_ref(value), JsonRef::Number(_)) => {
                    let n = number_text(value);
                    n.parse()
                        .map_err(|_| format!("expected an integer, got {n}"))?
                }
                other => return Err(format!("expected an integer, got {}", describe(other))),
            };
            if ty == ColumnType::Int32 && i32::try_from(v).is_err() {
                return Err(format!("integer {v} does not fit a 32-bit column"));
            }
            Ok(exact(Cell::Int(v)))
        }
        ColumnType::Float64 => {
            let text = numeric_text(item)?;
            parse_double(&text).map(|f| f.map(Cell::Float).into())
        }
        ColumnType::Decimal(p, s) => {
            let text = numeric_text(item)?;
            parse_decimal(&text, p, s).map(|f| f.map(Cell::Decimal).into())
        }
        ColumnType::Date32 => {
            let text = temporal_text(item)?;
            parse_date(&text).map(|f| f.map(Cell::Date).into())
        }
        ColumnType::Timestamp(_) => {
            let text = temporal_text(item)?;
            parse_timestamp_micros(&text).map(|f| f.map(Cell::Timestamp).into())
        }
        ColumnType::Time64 => {
            let text = temporal_text(item)?;
            parse_time_micros(&text).map(|f| f.map(Cell::Time).into())
        }
    }
}

fn describe(item: &Item<'_>) -> String {
    let t = item_text(item);
    let t: String = t.chars().take(60).collect();
    format!("{t:?}")
}

/// The FHIR lexical text of an item; objects and arrays as compact JSON.
pub fn item_text<'a>(item: &Item<'a>) -> Cow<'a, str> {
    match item {
        Item::Json { value, .. } => match json_ref(value) {
            JsonRef::String(s) => Cow::Borrowed(s),
            JsonRef::Number(n) => number_text(n),
            JsonRef::Bool(b) => Cow::Borrowed(if b { "true" } else { "false" }),
            JsonRef::Null => Cow::Borrowed(""),
            JsonRef::Array(_) | JsonRef::Object(_) => Cow::Owned(to_json_text(value)),
        },
        Item::Boolean(b) => Cow::Borrowed(if *b { "true" } else { "false" }),
        Item::Integer(i) => Cow::Owned(i.to_string()),
        Item::Decimal(s) | Item::String(s) | Item::Date(s) | Item::DateTime(s) | Item::Time(s) => {
            s.clone()
        }
    }
}

fn numeric_text<'a>(item: &Item<'a>) -> Result<Cow<'a, str>, ConvertError> {
    match item {
        Item::Json { value, .. } if matches!(json_ref(value), JsonRef::Number(_)) => {
            Ok(number_text(value))
        }
        Item::Integer(_) | Item::Decimal(_) => Ok(item_text(item)),
        other => Err(format!("expected a number, got {}", describe(other))),
    }
}

fn temporal_text<'a>(item: &Item<'a>) -> Result<Cow<'a, str>, ConvertError> {
    match item {
        Item::Json { value, .. } if matches!(json_ref(value), JsonRef::String(_)) => {
            Ok(item_text(item))
        }
        Item::String(_) | Item::Date(_) | Item::DateTime(_) | Item::Time(_) => Ok(item_text(item)),
        other => Err(format!(
            "expected a date/time string, got {}",
            describe(other)
        )),
    }
}

/// Parse a number's lexical form as an `f64`: the nearest one; null (not exact) beyond the
/// `f64` range, and `0` (not exact) for a non-zero value below it.
pub fn parse_double(text: &str) -> Result<Fit<f64>, ConvertError> {
    let (_, int_part, frac_part, _) =
        decimal_parts(text).ok_or_else(|| format!("expected a number, got {text:?}"))?;
    let v: f64 = text
        .parse()
        .map_err(|_| format!("expected a number, got {text:?}"))?;
    Ok(if v.is_infinite() {
        Fit::Null
    } else if v == 0.0 && int_part.bytes().chain(frac_part.bytes()).any(|b| b != b'0') {
        Fit::Nearest(0.0)
    } else {
        Fit::Exact(v)
    })
}

/// Parse a decimal's lexical form into an unscaled i128 at `scale` (`DECIMAL(precision,
/// scale)`): exact when it fits; rounded half away from zero to `scale` fraction digits when it
/// has more; [`Fit::Null`] when the (rounded) value has more than `precision` digits. Any
/// number of digits and any exponent is read without allocating.
pub fn parse_decimal(text: &str, precision: u8, scale: i8) -> Result<Fit<i128>, ConvertError> {
    let (neg, int_part, frac_part, exp) =
        decimal_parts(text).ok_or_else(|| format!("{text:?} is not a decimal number"))?;
    // value = digits × 10^(exp − frac_len); we want value × 10^scale, i.e. the digits shifted
    // by `shift`: the last −shift digits are rounded off, or shift zeros are appended. The
    // digit at index `n + shift` is the first one rounded off (an index below 0 means the
    // value is below half a unit, with only zeros there).
    let n = int_part.len() + frac_part.len();
    let shift = exp
        .saturating_sub(frac_part.len() as i64)
        .saturating_add(i64::from(scale));
    // Values must stay below 10^precision (precision ≤ 38, so that is an i128).
    let limit = POW10[usize::from(precision.min(38))];
    // The common case — at most 18 digits, none rounded off — in u64 arithmetic: FHIR
    // quantities are short, and i128 checked arithmetic per digit cost ~5× as much.
    if n <= 18 && shift >= 0 {
        let mut v: u64 = 0;
        for b in int_part.bytes().chain(frac_part.bytes()) {
            v = v * 10 + u64::from(b - b'0');
        }
        let v = i128::from(v);
        let scaled = match usize::try_from(shift).ok().and_then(|z| POW10.get(z)) {
            _ if v == 0 => Some(0),
            Some(p) => v.checked_mul(*p),
            None => None,
        };
        return Ok(match scaled {
            Some(s) if s < limit => Fit::Exact(if neg { -s } else { s }),
            _ => Fit::Null,
        });
    }
    let first_dropped = (n as i64).saturating_add(shift.min(0));
    let (mut v, mut rounding_digit, mut rest_nonzero) = (0i128, 0u8, false);
    for (i, b) in int_part.bytes().chain(frac_part.bytes()).enumerate() {
        let d = b - b'0';
        let i = i as i64;
        if i < first_dropped {
            // v < limit ≤ 10^38, so v × 10 may pass i128::MAX (≈ 1.7 × 10^38): checked.
            match v.checked_mul(10).and_then(|x| x.checked_add(i128::from(d))) {
                Some(x) if x < limit => v = x,
                _ => return Ok(Fit::Null),
            }
        } else if i == first_dropped {
            rounding_digit = d;
        } else {
            rest_nonzero |= d != 0;
        }
    }
    let exact = rounding_digit == 0 && !rest_nonzero;
    if rounding_digit >= 5 {
        v += 1;
        if v >= limit {
            return Ok(Fit::Null);
        }
    }
    if shift > 0 && v != 0 {
        let scaled = usize::try_from(shift)
            .ok()
            .and_then(|z| POW10.get(z))
            .and_then(|p| v.checked_mul(*p));
        match scaled {
            Some(s) if s < limit => v = s,
            _ => return Ok(Fit::Null),
        }
    }
    Ok(Fit::new(if neg { -v } else { v }, exact))
}

/// `10^i` for `i` in `0..=38`.
const POW10: [i128; 39] = {
    let mut t = [1i128; 39];
    let mut i = 1;
    while i < t.len() {
        t[i] = t[i - 1] * 10;
        i += 1;
    }
    t
};

/// `[+-]int[.frac][e[+-]exp]` as (negative, int digits, fraction digits, exponent); `None`
/// when `text` is not a decimal number. The exponent saturates far beyond any column's range,
/// so that `1e99999999999` (valid FHIR) reads as a huge value rather than failing. One pass
/// over the bytes.
fn decimal_parts(text: &str) -> Option<(bool, &str, &str, i64)> {
    let b = text.as_bytes();
    let (neg, start) = match b.first() {
        Some(b'-') => (true, 1),
        Some(b'+') => (false, 1),
        _ => (false, 0),
    };
    let digits_from = |i: usize| i + b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
    let int_end = digits_from(start);
    let (frac_start, frac_end) = match b.get(int_end) {
        Some(b'.') => (int_end + 1, digits_from(int_end + 1)),
        _ => (int_end, int_end),
    };
    let exp = match b.get(frac_end) {
        None => 0,
        Some(b'e' | b'E') => parse_exponent(&text[frac_end + 1..])?,
        Some(_) => return None,
    };
    (int_end > start || frac_end > frac_start)
        .then(|| (neg, &text[start..int_end], &text[frac_start..frac_end], exp))
}

/// Exponents are clamped to ±[`MAX_EXPONENT`]: far past 38 digits plus any line's length.
const MAX_EXPONENT: i64 = 1 << 40;

/// `[+-]digits` as an exponent, saturating at ±[`MAX_EXPONENT`].
fn parse_exponent(text: &str) -> Option<i64> {
    let (neg, digits) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut e: i64 = 0;
    for b in digits.bytes() {
        e = (e * 10 + i64::from(b - b'0')).min(MAX_EXPONENT);
    }
    Some(if neg { -e } else { e })
}

fn two(s: &str, at: usize) -> Option<u32> {
    let b = s.as_bytes().get(at..at + 2)?;
    if b.iter().all(u8::is_ascii_digit) {
        Some(((b[0] - b'0') as u32) * 10 + (b[1] - b'0') as u32)
    } else {
        None
    }
}

/// Parse the date part of a FHIR date/dateTime (`YYYY`, `YYYY-MM`, `YYYY-MM-DD`, `…T…`) to
/// days since the epoch; partial dates become the first day of their period. A date the FHIR
/// regex admits (month 01–12, day 01–31) but the calendar lacks (`2021-02-30`) is
/// [`Fit::Null`].
pub fn parse_date(text: &str) -> Result<Fit<i32>, ConvertError> {
    let (y, m, d) = date_parts(text).ok_or_else(|| format!("{text:?} is not a FHIR date"))?;
    Ok(match days_since_epoch(y, m, d) {
        Some(days) => Fit::Exact(days as i32),
        None => Fit::Null,
    })
}

/// Days from 1970-01-01 to the proleptic Gregorian date `y-m-d` (`m` in 1–12, `d` in 1–31);
/// `None` when the month has no day `d`. Computed directly (H. Hinnant's `days_from_civil`)
/// rather than through `chrono`'s date types, which cost several times as much per cell.
fn days_since_epoch(y: i32, m: u32, d: u32) -> Option<i64> {
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let month_days = match m {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if d > month_days {
        return None;
    }
    let y = i64::from(y) - i64::from(m <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

/// Year, month and day of a FHIR date or of a dateTime's date part, as far as the lexical form
/// goes (the first month or day of a partial date); `None` when it is not one.
fn date_parts(text: &str) -> Option<(i32, u32, u32)> {
    let b = text.as_bytes();
    if b.len() < 4 || !b[..4].iter().all(u8::is_ascii_digit) {
        return None;
    }
    let year = b[..4]
        .iter()
        .fold(0i32, |y, c| y * 10 + i32::from(c - b'0'));
    let (month, day) = match b.len() {
        4 => (1, 1),
        7 if b[4] == b'-' => (two(text, 5)?, 1),
        n if n >= 10 && b[4] == b'-' && b[7] == b'-' && (n == 10 || b[10] == b'T') => {
            (two(text, 5)?, two(text, 8)?)
        }
        _ => return None,
    };
    ((1..=12).contains(&month) && (1..=31).contains(&day)).then_some((year, month, day))
}

/// Parse a FHIR dateTime/instant/date to UTC microseconds since the epoch: rounded to the
/// microsecond, a leap second as the next minute's second 0 (both [`Fit::Nearest`]), and
/// [`Fit::Null`] for a date the calendar lacks.
pub fn parse_timestamp_micros(text: &str) -> Result<Fit<i64>, ConvertError> {
    match common_timestamp_micros(text.as_bytes()) {
        Some(micros) => Ok(Fit::Exact(micros)),
        None => any_timestamp_micros(text),
    }
}

/// [`parse_timestamp_micros`] of any form.
fn any_timestamp_micros(text: &str) -> Result<Fit<i64>, ConvertError> {
    let bad = || format!("{text:?} is not a FHIR dateTime");
    let (y, m, d) = date_parts(text).ok_or_else(bad)?;
    // Micros since midnight UTC, checked before the calendar so that a bad time is an error.
    let (micros, exact) = match text.get(11..).filter(|_| text.len() > 10) {
        None => (0, true),
        Some(time) => {
            // hh:mm(:ss(.fff)?)?(Z|±hh:mm)
            let tz_at = time
                .bytes()
                .position(|b| matches!(b, b'Z' | b'+' | b'-'))
                .ok_or_else(bad)?;
            let (clock, tz) = time.split_at(tz_at);
            let (micros, exact) = parse_clock(clock).ok_or_else(bad)?;
            let offset_secs: i64 = if tz == "Z" {
                0
            } else {
                let sign = if tz.starts_with('-') { -1 } else { 1 };
                let h = two(tz, 1).ok_or_else(bad)?;
                let m = two(tz, 4).ok_or_else(bad)?;
                if tz.len() != 6 || tz.as_bytes()[3] != b':' || h > 14 || m > 59 {
                    return Err(bad());
                }
                sign * (h as i64 * 3600 + m as i64 * 60)
            };
            (micros - offset_secs * 1_000_000, exact)
        }
    };
    let Some(days) = days_since_epoch(y, m, d) else {
        return Ok(Fit::Null);
    };
    Ok(Fit::new(days * 86_400_000_000 + micros, exact))
}

/// [`parse_timestamp_micros`] of the forms nearly every export uses,
/// `YYYY-MM-DDThh:mm:ss(.fff)?(Z|±hh:mm)`, read at fixed offsets: `None` for anything else and
/// for what is not an exact, valid instant of those forms (a leap second, a day the month
/// lacks, an error), which the general path then reads.
fn common_timestamp_micros(b: &[u8]) -> Option<i64> {
    let (frac, tz_at) = match b.len() {
        20 | 25 => (false, 19),
        24 | 29 => (true, 23),
        _ => return None,
    };
    let head: &[u8; 20] = b.get(..20)?.try_into().ok()?;
    const DIGITS: [usize; 14] = [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18];
    if DIGITS.iter().any(|&i| !head[i].is_ascii_digit())
        || head[4] != b'-'
        || head[7] != b'-'
        || head[10] != b'T'
        || head[13] != b':'
        || head[16] != b':'
    {
        return None;
    }
    // Two digits already checked.
    let two = |i: usize| i64::from(head[i] - b'0') * 10 + i64::from(head[i + 1] - b'0');
    let (year, month, day) = (two(0) * 100 + two(2), two(5), two(8));
    let (h, m, s) = (two(11), two(14), two(17));
    let us = match (frac, &b[19..]) {
        (false, _) => 0,
        (
            true,
            [
                b'.',
                f @ (b'0'..=b'9'),
                g @ (b'0'..=b'9'),
                k @ (b'0'..=b'9'),
                ..,
            ],
        ) => (i64::from(f - b'0') * 100 + i64::from(g - b'0') * 10 + i64::from(k - b'0')) * 1000,
        _ => return None,
    };
    let offset_secs = match &b[tz_at..] {
        [b'Z'] => 0,
        [
            sign @ (b'+' | b'-'),
            oh1 @ (b'0'..=b'9'),
            oh2 @ (b'0'..=b'9'),
            b':',
            om1 @ (b'0'..=b'9'),
            om2 @ (b'0'..=b'9'),
        ] => {
            let oh = i64::from(oh1 - b'0') * 10 + i64::from(oh2 - b'0');
            let om = i64::from(om1 - b'0') * 10 + i64::from(om2 - b'0');
            if oh > 14 || om > 59 {
                return None;
            }
            let secs = oh * 3600 + om * 60;
            if *sign == b'-' { -secs } else { secs }
        }
        _ => return None,
    };
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || s > 59 {
        return None;
    }
    let days = days_since_epoch(year as i32, month as u32, day as u32)?;
    let micros = ((h * 60 + m) * 60 + s) * 1_000_000 + us;
    Some(days * 86_400_000_000 + (micros - offset_secs * 1_000_000))
}

/// Parse `hh:mm(:ss(.fraction)?)?` to microseconds since midnight, and whether that is exact:
/// fraction digits past the microsecond are rounded half away from zero, and a leap second
/// (`:60`, which the FHIR regexes allow) counts as the next minute's second 0 — not exact
/// either way. The result may reach 24:00 (`23:59:60`).
fn parse_clock(clock: &str) -> Option<(i64, bool)> {
    let h = two(clock, 0)?;
    if clock.as_bytes().get(2) != Some(&b':') {
        return None;
    }
    let m = two(clock, 3)?;
    let (s, frac) = match clock.len() {
        5 => (0, ""),
        n if n >= 8 && clock.as_bytes()[5] == b':' => {
            let s = two(clock, 6)?;
            let frac = &clock[8..];
            let frac = match frac.strip_prefix('.') {
                Some(f) if !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()) => f,
                None if frac.is_empty() => "",
                _ => return None,
            };
            (s, frac)
        }
        _ => return None,
    };
    if h > 23 || m > 59 || s > 60 {
        return None;
    }
    let mut us: i64 = 0;
    for (i, d) in frac.bytes().take(6).enumerate() {
        us += (d - b'0') as i64 * 10i64.pow(5 - i as u32);
    }
    let (round, rest) = match frac.as_bytes().get(6..) {
        Some([r, rest @ ..]) => (*r, rest),
        _ => (b'0', &[][..]),
    };
    if round >= b'5' {
        us += 1;
    }
    let exact = s < 60 && round == b'0' && rest.iter().all(|b| *b == b'0');
    Some((
        ((h as i64 * 60 + m as i64) * 60 + s as i64) * 1_000_000 + us,
        exact,
    ))
}

/// Last microsecond of a day: a Time64 stops before 24:00.
const LAST_MICROSECOND: i64 = 86_400_000_000 - 1;

/// Parse a FHIR time (`hh:mm:ss(.fff)`) to microseconds since midnight, rounded to the
/// microsecond; a value past `23:59:59.999999` (a leap second at 23:59, or rounding up to
/// 24:00) is clamped to it. Either is [`Fit::Nearest`].
pub fn parse_time_micros(text: &str) -> Result<Fit<i64>, ConvertError> {
    let (us, exact) = parse_clock(text).ok_or_else(|| format!("{text:?} is not a FHIR time"))?;
    Ok(if us > LAST_MICROSECOND {
        Fit::Nearest(LAST_MICROSECOND)
    } else {
        Fit::new(us, exact)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use Fit::{Exact, Nearest, Null};

    #[test]
    fn decimals_are_exact_rounded_or_null() {
        assert_eq!(parse_decimal("0.000", 38, 2), Ok(Exact(0)));
        assert_eq!(parse_decimal("-0", 38, 2), Ok(Exact(0)));
        assert_eq!(parse_decimal("1E-2", 38, 2), Ok(Exact(1)));
        assert_eq!(parse_decimal("1.5", 38, 2), Ok(Exact(150)));
        assert_eq!(parse_decimal("-0.25", 38, 2), Ok(Exact(-25)));
        assert_eq!(parse_decimal("1.50", 38, 1), Ok(Exact(15)));
        assert_eq!(parse_decimal("12", 38, 3), Ok(Exact(12000)));
        assert_eq!(parse_decimal("1e2", 38, 0), Ok(Exact(100)));
        assert_eq!(
            parse_decimal("3.7952999123456789", 38, 18),
            Ok(Exact(3_795_299_912_345_678_900))
        );
        // Out of range: null.
        assert_eq!(parse_decimal("1e40", 38, 0), Ok(Null));
        assert_eq!(parse_decimal("1e2147483647", 38, 0), Ok(Null));
        assert_eq!(parse_decimal("1e99999999999999999999", 38, 0), Ok(Null));
        assert_eq!(parse_decimal("-1e40", 38, 18), Ok(Null));
        assert_eq!(parse_decimal("123", 2, 0), Ok(Null));
        assert_eq!(parse_decimal(&"9".repeat(21), 38, 18), Ok(Null));
        assert_eq!(parse_decimal("0e2147483647", 38, 0), Ok(Exact(0)));
        assert_eq!(parse_decimal("0e99999999999999999999", 38, 0), Ok(Exact(0)));
        // Too many fraction digits: rounded half away from zero.
        assert_eq!(parse_decimal("1.25", 38, 1), Ok(Nearest(13)));
        assert_eq!(parse_decimal("-1.25", 38, 1), Ok(Nearest(-13)));
        assert_eq!(parse_decimal("1.24999", 38, 1), Ok(Nearest(12)));
        assert_eq!(parse_decimal("0.5", 38, 0), Ok(Nearest(1)));
        assert_eq!(parse_decimal("2.5", 38, 0), Ok(Nearest(3)));
        assert_eq!(parse_decimal("-2.5", 38, 0), Ok(Nearest(-3)));
        assert_eq!(parse_decimal("0.04", 38, 1), Ok(Nearest(0)));
        assert_eq!(parse_decimal("0.0001", 38, 1), Ok(Nearest(0)));
        assert_eq!(parse_decimal("1e-99999999999", 38, 18), Ok(Nearest(0)));
        assert_eq!(
            parse_decimal("1.2000000000000000000000", 38, 18),
            Ok(Exact(1_200_000_000_000_000_000))
        );
        assert_eq!(
            parse_decimal("0.1234567890123456789012345", 38, 18),
            Ok(Nearest(123_456_789_012_345_679))
        );
        // Rounding up past the precision: null.
        assert_eq!(parse_decimal("99.96", 3, 1), Ok(Null));
        assert_eq!(parse_decimal("99.94", 3, 1), Ok(Nearest(999)));
        // The largest DECIMAL(38,18) value, and values next to it.
        let max = format!("{}.{}", "9".repeat(20), "9".repeat(18));
        assert_eq!(parse_decimal(&max, 38, 18), Ok(Exact(10i128.pow(38) - 1)));
        assert_eq!(
            parse_decimal(&format!("{max}4"), 38, 18),
            Ok(Nearest(10i128.pow(38) - 1))
        );
        assert_eq!(parse_decimal(&format!("{max}5"), 38, 18), Ok(Null));
        // Near i128::MAX / 10, where v × 10 + d could overflow.
        assert_eq!(
            parse_decimal("17014118346046923173168730371588410572.9", 38, 0),
            Ok(Nearest(17_014_118_346_046_923_173_168_730_371_588_410_573))
        );
        // Not numbers at all: errors.
        assert!(parse_decimal("abc", 38, 2).is_err());
        assert!(parse_decimal(".", 38, 2).is_err());
        assert!(parse_decimal("1e", 38, 2).is_err());
        assert!(parse_decimal("1e+", 38, 2).is_err());
    }

    /// The allocation-free parser agrees with the earlier string-shifting one on every value
    /// that fits, and with a rounding oracle on the others.
    #[test]
    fn decimal_parser_agrees_with_the_string_version() {
        let mantissas = [
            "0",
            "1",
            "10",
            "1.5",
            "1.50",
            "0.001",
            "123.456",
            "007.700",
            "99999999999999999999",
            "1234567890123456789012345678901234567",
            ".5",
            "5.",
            "",
            ".",
            "1.2.3",
            "a1",
        ];
        let exps = ["", "e0", "e2", "E-3", "e+1", "e40", "e-40", "ex"];
        for m in mantissas {
            for e in exps {
                for sign in ["", "-", "+"] {
                    let text = format!("{sign}{m}{e}");
                    for (p, sc) in [
                        (38, 0),
                        (38, 2),
                        (38, 18),
                        (10, 2),
                        (5, 0),
                        (3, 1),
                        (38, -2),
                    ] {
                        let got = parse_decimal(&text, p, sc).ok();
                        assert_eq!(
                            got.and_then(Fit::exact),
                            parse_decimal_with_strings(&text, p, sc),
                            "{text} as DECIMAL({p},{sc})"
                        );
                        assert_eq!(
                            got.map(Fit::value),
                            decimal_parts(&text).map(|_| rounded_with_strings(&text, p, sc)),
                            "{text} as DECIMAL({p},{sc}), rounded"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn decimal_parts_accept_json_numbers_only() {
        for bad in [
            "", ".", "-", "+", "1.2.3", "a1", "1a", "e5", ".e5", "1e", "1e+", "--1", "+-1", "1 ",
        ] {
            assert_eq!(decimal_parts(bad), None, "{bad:?}");
        }
        assert_eq!(decimal_parts("-1.50e-3"), Some((true, "1", "50", -3)));
        assert_eq!(decimal_parts("+.5"), Some((false, "", "5", 0)));
        assert_eq!(decimal_parts("5."), Some((false, "5", "", 0)));
        assert_eq!(decimal_parts("12E+2"), Some((false, "12", "", 2)));
    }

    #[test]
    fn days_since_epoch_matches_the_calendar() {
        use chrono::NaiveDate;
        let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap();
        for y in (0..=9999)
            .step_by(7)
            .chain([1900, 2000, 2100, 2400, 1969, 1970, 1972])
        {
            for m in 1..=12 {
                for d in 1..=31 {
                    let want = NaiveDate::from_ymd_opt(y, m, d).map(|x| (x - epoch).num_days());
                    assert_eq!(days_since_epoch(y, m, d), want, "{y}-{m}-{d}");
                }
            }
        }
    }

    /// Rounding (half away from zero) on strings, as an oracle: `None` when out of range.
    fn rounded_with_strings(text: &str, precision: u8, scale: i8) -> Option<i128> {
        let (neg, int_part, frac_part, exp) = decimal_parts(text)?;
        let shift = exp - frac_part.len() as i64 + scale as i64;
        let mut digits = format!("{int_part}{frac_part}");
        let mut up = false;
        if shift < 0 {
            let drop = (-shift) as usize;
            if drop > digits.len() {
                digits = "0".into();
            } else {
                let keep = digits.len() - drop;
                up = digits.as_bytes()[keep] >= b'5';
                digits.truncate(keep);
            }
        } else {
            digits.extend(std::iter::repeat_n('0', shift as usize));
        }
        let digits = digits.trim_start_matches('0');
        if digits.len() > 39 {
            return None;
        }
        let mut v: i128 = if digits.is_empty() {
            0
        } else {
            digits.parse().ok()?
        };
        if up {
            v += 1;
        }
        if v >= 10i128.pow(precision as u32) {
            return None;
        }
        Some(if neg { -v } else { v })
    }

    /// The earlier implementation's shifting, on strings, as an oracle.
    fn parse_decimal_with_strings(text: &str, precision: u8, scale: i8) -> Option<i128> {
        let (neg, int_part, frac_part, exp) = decimal_parts(text)?;
        let shift = exp - frac_part.len() as i64 + scale as i64;

        let mut digits = format!("{int_part}{frac_part}")
            .trim_start_matches('0')
            .to_string();
        if shift < 0 {
            let keep = digits.len().saturating_sub((-shift) as usize);
            if digits[keep..].bytes().any(|b| b != b'0') {
                return None;
            }
            digits.truncate(keep);
        } else {
            digits.extend(std::iter::repeat_n('0', shift as usize));
        }
        let digits = digits.trim_start_matches('0');
        if digits.len() > precision as usize {
            return None;
        }
        let v: i128 = if digits.is_empty() {
            0
        } else {
            digits.parse().ok()?
        };
        Some(if neg { -v } else { v })
    }

    #[test]
    fn partial_dates_start_their_period() {
        assert_eq!(parse_date("1970-01-01"), Ok(Exact(0)));
        assert_eq!(parse_date("1970"), Ok(Exact(0)));
        assert_eq!(parse_date("1970-02"), Ok(Exact(31)));
        assert_eq!(parse_date("1970-01-02T23:00:00-05:00"), Ok(Exact(1)));
        assert_eq!(parse_date("0001-01-01"), Ok(Exact(-719_162)));
        assert_eq!(parse_date("9999-12-31"), Ok(Exact(2_932_896)));
        // The regex admits day 01–31 in every month; the calendar does not.
        assert_eq!(parse_date("2021-02-30"), Ok(Null));
        assert_eq!(parse_date("2021-02-29"), Ok(Null));
        assert_eq!(parse_date("2020-02-29"), Ok(Exact(18_321)));
        assert_eq!(parse_date("2021-04-31T10:00:00Z"), Ok(Null));
        assert!(parse_date("1970-13-01").is_err());
        assert!(parse_date("1970-01-32").is_err());
        assert!(parse_date("1970-00").is_err());
        assert!(parse_date("70-01-01").is_err());
        assert!(parse_date("05/06/1970").is_err());
    }

    /// The fixed-offset reading of the common forms gives what the general path gives, and
    /// leaves it everything else: each byte of several templates replaced in turn.
    #[test]
    fn common_timestamps_match_the_general_path() {
        let templates = [
            "2010-09-06T15:38:27-04:00",
            "2010-09-06T15:38:27+14:00",
            "2010-09-06T15:38:27.139-04:00",
            "2010-09-06T15:38:27.139+05:30",
            "2010-09-06T15:38:27Z",
            "2010-09-06T15:38:27.139Z",
            "2024-02-29T23:59:59.999Z",
            "2023-02-29T00:00:00Z",
            "1900-12-31T23:59:60-00:00",
            "0001-01-01T00:00:00+00:00",
            "9999-12-31T23:59:59.999-14:00",
        ];
        let bytes = b"0123456789-+:.TZz /x\xc3";
        let mut checked = 0;
        for t in templates {
            let mut cases = vec![t.to_string()];
            for i in 0..t.len() {
                for &c in bytes {
                    let mut v = t.as_bytes().to_vec();
                    v[i] = c;
                    if let Ok(s) = String::from_utf8(v) {
                        cases.push(s);
                    }
                }
            }
            for c in cases {
                let general = any_timestamp_micros(&c);
                if let Some(v) = common_timestamp_micros(c.as_bytes()) {
                    checked += 1;
                    assert_eq!(general, Ok(Fit::Exact(v)), "{c}");
                }
                assert_eq!(parse_timestamp_micros(&c), general, "{c}");
            }
        }
        assert!(checked > 100, "{checked}");
        assert_eq!(
            parse_timestamp_micros("2010-09-06T15:38:27.139-04:00"),
            Ok(Fit::Exact(1_283_801_907_139_000))
        );
    }

    #[test]
    fn timestamps_normalise_to_utc() {
        let ts = parse_timestamp_micros;
        assert_eq!(ts("1970-01-01T00:00:00Z"), Ok(Exact(0)));
        assert_eq!(ts("1970-01-01T01:00:00+01:00"), Ok(Exact(0)));
        assert_eq!(ts("1970-01-01T00:00:00.5-00:00"), Ok(Exact(500_000)));
        assert_eq!(ts("1970-01-02"), Ok(Exact(86_400_000_000)));
        assert_eq!(ts("1970-01-01T14:00:00+14:00"), Ok(Exact(0)));
        assert_eq!(
            ts("1970-01-01T00:00:00-12:00"),
            Ok(Exact(12 * 3_600_000_000))
        );
        assert_eq!(
            ts("0001-01-01T00:00:00+14:00"),
            Ok(Exact(-62_135_596_800_000_000 - 14 * 3_600_000_000))
        );
        assert!(ts("1970-01-01T00:00:00").is_err());
        assert!(ts("1970-01-01T25:00:00Z").is_err());
        assert!(ts("1970-01-01T00:00:61Z").is_err());
        assert!(ts("1970-01-01T00:00:00+15:00").is_err());
    }

    #[test]
    fn timestamps_round_to_the_microsecond_and_leap_seconds_roll_over() {
        let ts = parse_timestamp_micros;
        // Nine and twelve fraction digits: rounded half away from zero.
        assert_eq!(ts("1970-01-01T00:00:00.123456789Z"), Ok(Nearest(123_457)));
        assert_eq!(
            ts("1970-01-01T00:00:00.123456489012Z"),
            Ok(Nearest(123_456))
        );
        assert_eq!(ts("1970-01-01T00:00:00.123456000000Z"), Ok(Exact(123_456)));
        assert_eq!(ts("1970-01-01T00:00:00.9999995Z"), Ok(Nearest(1_000_000)));
        // A leap second is the next minute's second 0 (POSIX time has none).
        let new_year = ts("2017-01-01T00:00:00Z").ok().and_then(Fit::exact);
        assert_eq!(
            ts("2016-12-31T23:59:60Z").ok().and_then(Fit::value),
            new_year
        );
        assert!(matches!(ts("2016-12-31T23:59:60Z"), Ok(Nearest(_))));
        assert_eq!(ts("1970-01-01T00:00:60.5+00:00"), Ok(Nearest(60_500_000)));
        // A date the calendar lacks: null.
        assert_eq!(ts("2021-02-30T10:00:00Z"), Ok(Null));
        assert_eq!(ts("2021-02-30"), Ok(Null));
        // ... but a bad time is still an error.
        assert!(ts("2021-02-30T10:00Z00").is_err());
        assert!(ts("2021-02-30T10:00:00").is_err());
    }

    #[test]
    fn times_round_and_clamp_to_the_day() {
        let t = parse_time_micros;
        assert_eq!(t("00:00:00"), Ok(Exact(0)));
        assert_eq!(t("12:34:56.789"), Ok(Exact(45_296_789_000)));
        assert_eq!(t("12:34:56.7890004"), Ok(Nearest(45_296_789_000)));
        assert_eq!(t("12:34:60"), Ok(Nearest(45_300_000_000)));
        assert_eq!(t("23:59:60"), Ok(Nearest(LAST_MICROSECOND)));
        assert_eq!(t("23:59:60.999999999"), Ok(Nearest(LAST_MICROSECOND)));
        assert_eq!(t("23:59:59.9999999"), Ok(Nearest(LAST_MICROSECOND)));
        assert_eq!(t("23:59:59.999999"), Ok(Exact(LAST_MICROSECOND)));
        assert!(t("24:00:00").is_err());
        assert!(t("12:00:00.").is_err());
    }

    #[test]
    fn doubles_are_nearest_or_null_beyond_range() {
        assert_eq!(parse_double("1.5"), Ok(Exact(1.5)));
        assert_eq!(parse_double("0.1"), Ok(Exact(0.1)));
        assert_eq!(parse_double("0e-400"), Ok(Exact(0.0)));
        assert_eq!(parse_double("1e400"), Ok(Null));
        assert_eq!(parse_double("-1e400"), Ok(Null));
        assert_eq!(parse_double("1e99999999999999999999"), Ok(Null));
        assert_eq!(parse_double("1e-400"), Ok(Nearest(0.0)));
        assert!(parse_double("abc").is_err());
        assert!(parse_double("inf").is_err());
        assert!(parse_double("NaN").is_err());
    }

    /// Every value FHIR's regexes admit for a type converts for its native column (exactly,
    /// to the nearest value, or to null) — none is an error.
    #[test]
    fn every_valid_fhir_value_converts() {
        use crate::view::json::JsonDoc;
        let numbers: &[(ColumnType, &[&str])] = &[
            (
                ColumnType::Decimal(38, 18),
                &[
                    "0",
                    "-0",
                    "0.1234567890123456789012345",
                    "1e40",
                    "-1E-40",
                    "1e+5",
                    "10000000000000000000000000000000000000000",
                    "123.4567890123456789012",
                    "1e99999999999999999999",
                    "1e-99999999999999999999",
                ],
            ),
            (ColumnType::Float64, &["1e400", "1e-400", "0.1", "-12.5e3"]),
            (ColumnType::Int32, &["0", "-0", "2147483647", "-2147483648"]),
        ];
        let strings: &[(ColumnType, &[&str])] = &[
            (
                ColumnType::Date32,
                &[
                    "0001",
                    "0001-01",
                    "0001-01-01",
                    "9999-12-31",
                    "2021-02-30",
                    "2020-02-29",
                ],
            ),
            (
                ColumnType::Timestamp(true),
                &[
                    "2020",
                    "2020-01",
                    "2020-01-01",
                    "0001-01-01T00:00:00+14:00",
                    "2016-12-31T23:59:60Z",
                    "2020-01-01T00:00:00.123456789012Z",
                    "2020-01-01T00:00:00-13:59",
                    "2020-01-01T00:00:00+14:00",
                    "9999-12-31T23:59:60.9999999-14:00",
                    "2021-02-30T00:00:00Z",
                ],
            ),
            (
                ColumnType::Time64,
                &[
                    "00:00:00",
                    "23:59:60",
                    "23:59:59.9999999999",
                    "12:00:00.000000001",
                ],
            ),
        ];
        for (json, cases) in [(false, numbers), (true, strings)] {
            for (ty, values) in cases {
                for v in *values {
                    let text = if json {
                        format!("{v:?}")
                    } else {
                        v.to_string()
                    };
                    let doc = JsonDoc::parse(&text).expect("JSON");
                    let got = convert(&Item::json(doc.root()), *ty);
                    assert!(got.is_ok(), "{v} as {ty:?}: {got:?}");
                }
            }
        }
    }

    #[test]
    fn ansi_tags() {
        assert_eq!(
            ColumnType::from_ansi("decimal(38, 18)"),
            Some(ColumnType::Decimal(38, 18))
        );
        assert_eq!(
            ColumnType::from_ansi("TIMESTAMP  WITH TIME ZONE"),
            Some(ColumnType::Timestamp(true))
        );
        assert_eq!(ColumnType::from_ansi("DATE"), Some(ColumnType::Date32));
        assert_eq!(ColumnType::from_ansi("BLOB"), None);
        assert_eq!(ColumnType::from_ansi("DECIMAL(40,2)"), None);
    }
}
