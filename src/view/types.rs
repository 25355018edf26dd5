//! FHIR → Arrow type mapping and the conversion of FHIRPath results into typed cells.
//!
//! Without an `ansi/type` tag a column follows the SQL-on-FHIR default mapping: boolean →
//! Boolean, integer-like → Int32, everything else (decimal, date, dateTime, instant, time, string
//! types) → Utf8 in its FHIR lexical form, so nothing is lost. An `ansi/type` tag asks for a native
//! type; the conversion then either fits exactly or fails, and the caller rejects the resource —
//! a value is never rounded or shifted silently:
//!
//! * `DECIMAL(p,s)` — exact; more than `s` significant fraction digits or more than `p` digits fails.
//! * `DATE` — a partial date (`2020`, `2020-05`) becomes the first day of that period; a dateTime
//!   keeps its date part as written (no time zone shift).
//! * `TIMESTAMP [WITH TIME ZONE]` — the instant in UTC microseconds; a value with an offset is
//!   converted to UTC (the same instant); a partial value or one without a time becomes the start
//!   of that period in UTC. Views that care keep the text in a companion column.

use std::borrow::Cow;

use super::json::{JsonRef, json_ref, number_text, to_json_text};
use chrono::NaiveDate;
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

/// Convert one FHIRPath item into a cell of type `ty`.
pub fn convert<'a>(item: &Item<'a>, ty: ColumnType) -> Result<Cell<'a>, ConvertError> {
    match ty {
        ColumnType::Utf8 => Ok(Cell::Str(item_text(item))),
        ColumnType::Boolean => match item {
            Item::Boolean(b) => Ok(Cell::Bool(*b)),
            Item::Json { value, .. } if matches!(json_ref(value), JsonRef::Bool(_)) => {
                Ok(Cell::Bool(matches!(json_ref(value), JsonRef::Bool(true))))
            }
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
            Ok(Cell::Int(v))
        }
        ColumnType::Float64 => {
            let text = numeric_text(item)?;
            text.parse::<f64>()
                .map(Cell::Float)
                .map_err(|_| format!("expected a number, got {text:?}"))
        }
        ColumnType::Decimal(p, s) => {
            let text = numeric_text(item)?;
            parse_decimal(&text, p, s).map(Cell::Decimal)
        }
        ColumnType::Date32 => {
            let text = temporal_text(item)?;
            parse_date(&text).map(Cell::Date)
        }
        ColumnType::Timestamp(_) => {
            let text = temporal_text(item)?;
            parse_timestamp_micros(&text).map(Cell::Timestamp)
        }
        ColumnType::Time64 => {
            let text = temporal_text(item)?;
            parse_time_micros(&text).map(Cell::Time)
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

/// Parse a decimal's lexical form into an unscaled i128 at `scale`, exactly.
pub fn parse_decimal(text: &str, precision: u8, scale: i8) -> Result<i128, ConvertError> {
    let err = || format!("{text:?} does not fit DECIMAL({precision},{scale})");
    let (neg, int_part, frac_part, exp) =
        decimal_parts(text).ok_or_else(|| format!("{text:?} is not a decimal number"))?;
    // value = digits × 10^(exp − frac_len); we want value × 10^scale, i.e. the digits shifted
    // by `shift`: the last −shift digits are dropped (and must be zeros), or shift zeros added.
    // Digits are accumulated without allocating; at most `precision` (≤ 38) significant digits
    // are kept, so the i128 cannot overflow.
    let shift = i64::from(exp) - frac_part.len() as i64 + i64::from(scale);
    let total = int_part.len() + frac_part.len();
    let keep = if shift < 0 {
        total.saturating_sub(usize::try_from(-shift).unwrap_or(usize::MAX))
    } else {
        total
    };
    let (mut v, mut significant) = (0i128, 0usize);
    for (i, b) in int_part.bytes().chain(frac_part.bytes()).enumerate() {
        let d = i128::from(b - b'0');
        if i >= keep {
            if d != 0 {
                return Err(err());
            }
        } else if significant > 0 || d != 0 {
            significant += 1;
            if significant > usize::from(precision) {
                return Err(err());
            }
            v = v * 10 + d;
        }
    }
    if shift > 0 && v != 0 {
        let zeros = usize::try_from(shift).unwrap_or(usize::MAX);
        if significant.saturating_add(zeros) > usize::from(precision) {
            return Err(err());
        }
        v = 10i128
            .checked_pow(zeros as u32)
            .and_then(|p| v.checked_mul(p))
            .ok_or_else(err)?;
    }
    Ok(if neg { -v } else { v })
}

/// `[+-]int[.frac][e[+-]exp]` as (negative, int digits, fraction digits, exponent); `None`
/// when `text` is not a decimal number.
fn decimal_parts(text: &str) -> Option<(bool, &str, &str, i32)> {
    let (neg, body) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    // Exponent form (allowed in JSON numbers).
    let (mantissa, exp) = match body.find(['e', 'E']) {
        Some(i) => (&body[..i], body[i + 1..].parse::<i32>().ok()?),
        None => (body, 0),
    };
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    (!(int_part.is_empty() && frac_part.is_empty()) && digits(int_part) && digits(frac_part))
        .then_some((neg, int_part, frac_part, exp))
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
/// days since the epoch; partial dates become the first day of their period.
pub fn parse_date(text: &str) -> Result<i32, ConvertError> {
    date_of(text)
        .map(|d| (d - NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default()).num_days() as i32)
        .ok_or_else(|| format!("{text:?} is not a FHIR date"))
}

fn date_of(text: &str) -> Option<NaiveDate> {
    let b = text.as_bytes();
    if b.len() < 4 || !b[..4].iter().all(u8::is_ascii_digit) {
        return None;
    }
    let year: i32 = text[..4].parse().ok()?;
    let (month, day) = match b.len() {
        4 => (1, 1),
        7 if b[4] == b'-' => (two(text, 5)?, 1),
        n if n >= 10 && b[4] == b'-' && b[7] == b'-' && (n == 10 || b[10] == b'T') => {
            (two(text, 5)?, two(text, 8)?)
        }
        _ => return None,
    };
    NaiveDate::from_ymd_opt(year, month, day)
}

/// Parse a FHIR dateTime/instant/date to UTC microseconds since the epoch.
pub fn parse_timestamp_micros(text: &str) -> Result<i64, ConvertError> {
    let bad = || format!("{text:?} is not a FHIR dateTime");
    let date = date_of(text).ok_or_else(bad)?;
    let midnight = date
        .and_hms_opt(0, 0, 0)
        .ok_or_else(bad)?
        .and_utc()
        .timestamp_micros();
    let Some(time) = text.get(11..).filter(|_| text.len() > 10) else {
        return Ok(midnight);
    };
    // hh:mm(:ss(.fff)?)?(Z|±hh:mm)
    let tz_at = time.find(['Z', '+', '-']).ok_or_else(bad)?;
    let (clock, tz) = time.split_at(tz_at);
    let micros = parse_clock(clock).ok_or_else(bad)?;
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
    Ok(midnight + micros - offset_secs * 1_000_000)
}

/// Parse `hh:mm(:ss(.fraction)?)?` to microseconds since midnight.
fn parse_clock(clock: &str) -> Option<i64> {
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
    Some(((h as i64 * 60 + m as i64) * 60 + s as i64) * 1_000_000 + us)
}

/// Parse a FHIR time (`hh:mm:ss(.fff)`) to microseconds since midnight.
pub fn parse_time_micros(text: &str) -> Result<i64, ConvertError> {
    parse_clock(text).ok_or_else(|| format!("{text:?} is not a FHIR time"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_exact_or_rejected() {
        assert_eq!(parse_decimal("0.000", 38, 2), Ok(0));
        assert_eq!(parse_decimal("-0", 38, 2), Ok(0));
        assert_eq!(parse_decimal("1E-2", 38, 2), Ok(1));
        assert!(parse_decimal("1e40", 38, 0).is_err());
        assert!(parse_decimal("1e2147483647", 38, 0).is_err());
        assert_eq!(parse_decimal("0e2147483647", 38, 0), Ok(0));
        assert_eq!(parse_decimal("1.5", 38, 2), Ok(150));
        assert_eq!(parse_decimal("-0.25", 38, 2), Ok(-25));
        assert_eq!(parse_decimal("1.50", 38, 1), Ok(15));
        assert_eq!(parse_decimal("12", 38, 3), Ok(12000));
        assert_eq!(parse_decimal("1e2", 38, 0), Ok(100));
        assert_eq!(
            parse_decimal("3.7952999123456789", 38, 18),
            Ok(3_795_299_912_345_678_900)
        );
        assert!(parse_decimal("1.25", 38, 1).is_err());
        assert!(parse_decimal("123", 2, 0).is_err());
        assert!(parse_decimal("abc", 38, 2).is_err());
        assert!(parse_decimal(".", 38, 2).is_err());
    }

    /// The allocation-free parser agrees with the earlier string-shifting one.
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
                        assert_eq!(
                            parse_decimal(&text, p, sc).ok(),
                            parse_decimal_with_strings(&text, p, sc),
                            "{text} as DECIMAL({p},{sc})"
                        );
                    }
                }
            }
        }
    }

    /// The earlier implementation's shifting, on strings, as an oracle.
    fn parse_decimal_with_strings(text: &str, precision: u8, scale: i8) -> Option<i128> {
        let (neg, int_part, frac_part, exp) = decimal_parts(text)?;
        let shift = exp - frac_part.len() as i32 + scale as i32;
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
        assert_eq!(parse_date("1970-01-01"), Ok(0));
        assert_eq!(parse_date("1970"), Ok(0));
        assert_eq!(parse_date("1970-02"), Ok(31));
        assert_eq!(parse_date("1970-01-02T23:00:00-05:00"), Ok(1));
        assert!(parse_date("1970-13-01").is_err());
        assert!(parse_date("70-01-01").is_err());
    }

    #[test]
    fn timestamps_normalise_to_utc() {
        assert_eq!(parse_timestamp_micros("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_timestamp_micros("1970-01-01T01:00:00+01:00"), Ok(0));
        assert_eq!(
            parse_timestamp_micros("1970-01-01T00:00:00.5-00:00"),
            Ok(500_000)
        );
        assert_eq!(parse_timestamp_micros("1970-01-02"), Ok(86_400_000_000));
        assert!(parse_timestamp_micros("1970-01-01T00:00:00").is_err());
        assert!(parse_timestamp_micros("1970-01-01T25:00:00Z").is_err());
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
