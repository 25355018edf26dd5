//! Value semantics: classification of items, exact decimals, partial dates/times, equality,
//! equivalence and ordering.
//!
//! Decimals are exact: a decimal is an `i128` mantissa with a base-10 scale (`1.50` is
//! `150 × 10⁻²`), so `0.1 + 0.2 = 0.3` holds and the lexical precision is kept (`1.0 + 1` is
//! `2.0`). Division keeps up to [`DIV_SCALE`] fraction digits, rounded half away from zero,
//! without trailing zeros. Results that do not fit are empty (FHIRPath's rule for overflow).
//!
//! FHIR decimals have arbitrary precision. A value with more than [`MAX_DIGITS`] significant
//! digits or [`MAX_PARSE_SCALE`] fraction digits is first read without its trailing zeros
//! (`0.1000…0` is `0.1`); if it still does not fit it stays text ([`Val::BigDec`]) and is
//! compared exactly through [`Sci`] (sign, digits and exponent, no precision cap), so `=`,
//! `<`, `~`, `in` and `where` work on it. Arithmetic on it fails with an error that gives its
//! size rather than a wrong or empty result.

use std::borrow::Cow;
use std::cmp::Ordering;

use crate::view::json::{Json, JsonRef, json_ref, number_text};

use super::types::Item;

/// Fraction digits kept by decimal division.
pub const DIV_SCALE: u32 = 16;

/// Most significant digits a [`Decimal`] holds (an `i128` holds 38; the rest is headroom for
/// aligning scales).
pub(crate) const MAX_DIGITS: usize = 36;

/// Most fraction digits a parsed [`Decimal`] keeps.
pub(crate) const MAX_PARSE_SCALE: u32 = 60;

/// Room for the digits of an `i128`.
const SCI_BUF: usize = 40;

/// Largest scale kept by multiplication before rounding.
const MAX_SCALE: u32 = 30;

/// An exact decimal: `mantissa × 10^-scale`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Decimal {
    pub(crate) mantissa: i128,
    pub(crate) scale: u32,
}

fn pow10(n: u32) -> Option<i128> {
    10i128.checked_pow(n)
}

impl Decimal {
    pub(crate) fn from_i64(i: i64) -> Decimal {
        Decimal {
            mantissa: i128::from(i),
            scale: 0,
        }
    }

    /// Parse a lexical decimal (`-1.50`, `3`, JSON exponent forms like `1.5e3`) with its
    /// written precision. `None` when the text is not a decimal or does not fit (more than
    /// [`MAX_DIGITS`] significant digits, or more than [`MAX_PARSE_SCALE`] fraction digits):
    /// [`Sci`] reads those exactly.
    pub(crate) fn parse(s: &str) -> Option<Decimal> {
        let l = Lexical::parse(s)?;
        let digits = l.int.iter().chain(l.frac).skip_while(|b| **b == b'0');
        let scale = i64::try_from(l.frac.len()).ok()? - l.exp;
        Decimal::from_digits(l.neg, digits, scale)
    }

    /// The value of `x` when it fits; trailing zeros are not kept (`0.1000…0` with any number
    /// of zeros is `0.1`).
    fn from_sci(x: Sci<'_>) -> Option<Decimal> {
        let n = i64::try_from(x.a.len() + x.b.len()).ok()?;
        Decimal::from_digits(x.neg, x.a.iter().chain(x.b), n - x.exp)
    }

    /// `digits × 10^-scale`: at most [`MAX_DIGITS`] digits (no leading zeros) and a scale of at
    /// most [`MAX_PARSE_SCALE`] once a negative scale is folded into the mantissa.
    fn from_digits<'d>(
        neg: bool,
        digits: impl Iterator<Item = &'d u8>,
        mut scale: i64,
    ) -> Option<Decimal> {
        let mut mantissa: i128 = 0;
        let mut n = 0;
        for d in digits {
            n += 1;
            if n > MAX_DIGITS {
                return None;
            }
            mantissa = mantissa * 10 + i128::from(d - b'0');
        }
        if scale < 0 {
            mantissa = mantissa.checked_mul(pow10(u32::try_from(-scale).ok()?)?)?;
            scale = 0;
        }
        if scale > i64::from(MAX_PARSE_SCALE) {
            return None;
        }
        Some(Decimal {
            mantissa: if neg { -mantissa } else { mantissa },
            scale: u32::try_from(scale).ok()?,
        })
    }

    fn rescale(self, scale: u32) -> Option<i128> {
        self.mantissa
            .checked_mul(pow10(scale.checked_sub(self.scale)?)?)
    }

    fn aligned(self, other: Decimal) -> Option<(i128, i128, u32)> {
        let s = self.scale.max(other.scale);
        Some((self.rescale(s)?, other.rescale(s)?, s))
    }

    pub(crate) fn cmp_value(self, other: Decimal) -> Ordering {
        match self.aligned(other) {
            Some((a, b, _)) => a.cmp(&b),
            // Too far apart to align in an `i128`: compare the digits.
            None => {
                let (mut a, mut b) = ([0u8; SCI_BUF], [0u8; SCI_BUF]);
                self.sci(&mut a).cmp_value(&other.sci(&mut b))
            }
        }
    }

    /// This value as a [`Sci`] over digits written into `buf`.
    fn sci(self, buf: &mut [u8; SCI_BUF]) -> Sci<'_> {
        let mut m = self.mantissa.unsigned_abs();
        let mut i = SCI_BUF;
        loop {
            i -= 1;
            // `m % 10` is a single digit.
            buf[i] = b'0' + (m % 10) as u8;
            m /= 10;
            if m == 0 {
                break;
            }
        }
        Sci::new(
            self.mantissa < 0,
            &buf[i..],
            &[],
            -i64::from(self.scale),
            i64::from(self.scale),
        )
    }

    pub(crate) fn add(self, other: Decimal) -> Option<Decimal> {
        let (a, b, scale) = self.aligned(other)?;
        Some(Decimal {
            mantissa: a.checked_add(b)?,
            scale,
        })
    }

    pub(crate) fn sub(self, other: Decimal) -> Option<Decimal> {
        let (a, b, scale) = self.aligned(other)?;
        Some(Decimal {
            mantissa: a.checked_sub(b)?,
            scale,
        })
    }

    pub(crate) fn mul(self, other: Decimal) -> Option<Decimal> {
        let d = Decimal {
            mantissa: self.mantissa.checked_mul(other.mantissa)?,
            scale: self.scale + other.scale,
        };
        if d.scale > MAX_SCALE {
            Some(d.round_to(MAX_SCALE))
        } else {
            Some(d)
        }
    }

    /// Division with [`DIV_SCALE`] digits, trailing zeros removed (at least one fraction digit
    /// is kept so the value still reads as a decimal). `None` on division by zero or overflow.
    pub(crate) fn div(self, other: Decimal) -> Option<Decimal> {
        if other.mantissa == 0 {
            return None;
        }
        // self/other = (a.m * 10^(b.s + T)) / (b.m * 10^a.s) at scale T.
        let num = self.mantissa.checked_mul(pow10(other.scale + DIV_SCALE)?)?;
        let den = other.mantissa.checked_mul(pow10(self.scale)?)?;
        let q = num.checked_div(den)?;
        let r = num.checked_rem(den)?;
        let q = if r.checked_abs()?.checked_mul(2)? >= den.checked_abs()? {
            if (num < 0) != (den < 0) {
                q.checked_sub(1)?
            } else {
                q.checked_add(1)?
            }
        } else {
            q
        };
        Some(
            Decimal {
                mantissa: q,
                scale: DIV_SCALE,
            }
            .normalize(1),
        )
    }

    /// Truncated integer division and remainder (`div`/`mod` on decimals).
    pub(crate) fn div_mod(self, other: Decimal) -> Option<(i128, Decimal)> {
        let (a, b, scale) = self.aligned(other)?;
        if b == 0 {
            return None;
        }
        Some((
            a.checked_div(b)?,
            Decimal {
                mantissa: a.checked_rem(b)?,
                scale,
            },
        ))
    }

    /// Remove trailing fraction zeros, keeping at least `min_scale` digits.
    pub(crate) fn normalize(mut self, min_scale: u32) -> Decimal {
        while self.scale > min_scale && self.mantissa % 10 == 0 {
            self.mantissa /= 10;
            self.scale -= 1;
        }
        self
    }

    /// Round half away from zero to `scale` fraction digits (only reduces the scale).
    pub(crate) fn round_to(self, scale: u32) -> Decimal {
        if self.scale <= scale {
            return self;
        }
        let Some(p) = pow10(self.scale - scale) else {
            return Decimal { mantissa: 0, scale };
        };
        let q = self.mantissa / p;
        let r = self.mantissa % p;
        // `2|r| >= p`, written so that it cannot overflow.
        let q = if r.abs() >= p - r.abs() {
            q + self.mantissa.signum()
        } else {
            q
        };
        Decimal { mantissa: q, scale }
    }

    /// Round towards negative (`floor`) or positive infinity to `scale` digits.
    pub(crate) fn floor_ceil_to(self, scale: u32, ceil: bool) -> Decimal {
        if self.scale <= scale {
            return self;
        }
        let Some(p) = pow10(self.scale - scale) else {
            return Decimal { mantissa: 0, scale };
        };
        let q = self.mantissa.div_euclid(p);
        let r = self.mantissa.rem_euclid(p);
        Decimal {
            mantissa: if ceil && r != 0 { q + 1 } else { q },
            scale,
        }
    }

    /// Extend the scale with zeros (no-op when already at least `scale`).
    pub(crate) fn with_min_scale(self, scale: u32) -> Option<Decimal> {
        if self.scale >= scale {
            return Some(self);
        }
        Some(Decimal {
            mantissa: self.rescale(scale)?,
            scale,
        })
    }

    /// The integer value when the fraction is zero and it fits an `i64`.
    pub(crate) fn to_i64_exact(self) -> Option<i64> {
        let p = pow10(self.scale)?;
        if self.mantissa % p != 0 {
            return None;
        }
        i64::try_from(self.mantissa / p).ok()
    }

    /// The integer part (truncated), when it fits an `i64`.
    pub(crate) fn trunc_i64(self) -> Option<i64> {
        i64::try_from(self.mantissa / pow10(self.scale)?).ok()
    }
}

impl std::fmt::Display for Decimal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let neg = self.mantissa < 0;
        let digits = self.mantissa.unsigned_abs().to_string();
        let scale = self.scale as usize;
        let sign = if neg { "-" } else { "" };
        if scale == 0 {
            return write!(f, "{sign}{digits}");
        }
        let padded = if digits.len() <= scale {
            format!("{}{digits}", "0".repeat(scale + 1 - digits.len()))
        } else {
            digits
        };
        let (int, frac) = padded.split_at(padded.len() - scale);
        write!(f, "{sign}{int}.{frac}")
    }
}

/// The parts of a decimal's text: `[+-]int[.frac][(e|E)[+-]exp]`, digits only.
struct Lexical<'s> {
    neg: bool,
    int: &'s [u8],
    frac: &'s [u8],
    exp: i64,
}

impl<'s> Lexical<'s> {
    fn parse(s: &'s str) -> Option<Lexical<'s>> {
        let s = s.trim();
        let (neg, body) = match s.as_bytes().first()? {
            b'-' => (true, &s[1..]),
            b'+' => (false, &s[1..]),
            _ => (false, s),
        };
        let (num, exp) = match body.find(['e', 'E']) {
            Some(i) => (&body[..i], body[i + 1..].parse::<i64>().ok()?),
            None => (body, 0),
        };
        let (int, frac) = match num.find('.') {
            Some(i) => (&num[..i], &num[i + 1..]),
            None => (num, ""),
        };
        if int.is_empty() && frac.is_empty() {
            return None;
        }
        if !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(Lexical {
            neg,
            int: int.as_bytes(),
            frac: frac.as_bytes(),
            exp,
        })
    }
}

/// The exact value of any decimal, read from its text without allocating and without a
/// precision limit: `±0.d₁d₂…dₙ × 10^exp`, where the significant digits `d` are `a` followed
/// by `b` (two slices of the text, around the decimal point) with no leading or trailing zeros.
/// Zero has no digits. `1.50`, `1.5` and `15e-1` are all `0.15 × 10¹`.
///
/// FHIR decimals have arbitrary precision, so comparisons and equality use this when a value
/// does not fit a [`Decimal`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sci<'s> {
    neg: bool,
    a: &'s [u8],
    b: &'s [u8],
    exp: i64,
    /// Fraction digits as written (trailing zeros included), the precision `~` rounds to.
    scale: i64,
}

impl<'s> Sci<'s> {
    /// Parse a decimal's text (`None` when it is not one, or its exponent overflows).
    pub(crate) fn parse(s: &'s str) -> Option<Sci<'s>> {
        let l = Lexical::parse(s)?;
        let scale = i64::try_from(l.frac.len()).ok()?.checked_sub(l.exp)?;
        let int_len = i64::try_from(l.int.len()).ok()?;
        // Bound the exponent so that `exp` arithmetic below cannot overflow.
        if l.exp.unsigned_abs() > 1 << 60 || int_len > 1 << 60 || scale.unsigned_abs() > 1 << 61 {
            return None;
        }
        Some(Sci::new(l.neg, l.int, l.frac, l.exp, scale))
    }

    /// `±int.frac × 10^exp`, normalised.
    fn new(neg: bool, int: &'s [u8], frac: &'s [u8], exp: i64, scale: i64) -> Sci<'s> {
        let lead = |d: &'s [u8]| &d[d.iter().take_while(|b| **b == b'0').count()..];
        let trail =
            |d: &'s [u8]| &d[..d.len() - d.iter().rev().take_while(|b| **b == b'0').count()];
        let int = lead(int);
        let (a, b, exp) = if int.is_empty() {
            let f = lead(frac);
            // Lengths of text slices fit an i64.
            (f, &[][..], exp - (frac.len() - f.len()) as i64)
        } else {
            (int, frac, exp + int.len() as i64)
        };
        let (a, b) = match trail(b) {
            [] => (trail(a), &[][..]),
            b => (a, b),
        };
        Sci {
            neg,
            a,
            b,
            exp,
            scale,
        }
    }

    fn is_zero(&self) -> bool {
        self.a.is_empty() && self.b.is_empty()
    }

    fn digits(&self) -> impl Iterator<Item = &'s u8> + use<'s> {
        self.a.iter().chain(self.b)
    }

    /// Number of significant digits.
    pub(crate) fn digit_count(&self) -> usize {
        self.a.len() + self.b.len()
    }

    /// Fraction digits needed to write the value exactly (0 for integers).
    pub(crate) fn frac_digits(&self) -> i64 {
        (i64::try_from(self.digit_count()).unwrap_or(i64::MAX) - self.exp).max(0)
    }

    /// Exact numeric order.
    pub(crate) fn cmp_value(&self, other: &Sci<'_>) -> Ordering {
        let sign = |x: &Sci<'_>| match (x.is_zero(), x.neg) {
            (true, _) => 0,
            (false, true) => -1,
            (false, false) => 1,
        };
        let (sa, sb) = (sign(self), sign(other));
        if sa != sb || sa == 0 {
            return sa.cmp(&sb);
        }
        let magnitude = self
            .exp
            .cmp(&other.exp)
            .then_with(|| self.digits().cmp(other.digits()));
        if sa < 0 {
            magnitude.reverse()
        } else {
            magnitude
        }
    }

    /// The digits and exponent after rounding half away from zero to `scale` fraction digits.
    fn rounded(&self, scale: i64) -> (Vec<u8>, i64) {
        let keep = self.exp.saturating_add(scale);
        let len = i64::try_from(self.digit_count()).unwrap_or(i64::MAX);
        if keep >= len {
            return (self.digits().copied().collect(), self.exp);
        }
        if keep < 0 {
            return (Vec::new(), 0);
        }
        // 0 <= keep < len.
        let keep = keep as usize;
        let mut d: Vec<u8> = self.digits().take(keep).copied().collect();
        let mut exp = self.exp;
        if self.digits().nth(keep).is_some_and(|x| *x >= b'5') {
            while d.last() == Some(&b'9') {
                d.pop();
            }
            match d.last_mut() {
                Some(x) => *x += 1,
                None => {
                    d.push(b'1');
                    exp += 1;
                }
            }
        }
        while d.last() == Some(&b'0') {
            d.pop();
        }
        if d.is_empty() {
            exp = 0;
        }
        (d, exp)
    }

    /// FHIRPath `~` on decimals: equal when rounded to the precision of the less precise one.
    fn equivalent(&self, other: &Sci<'_>) -> bool {
        let s = self.scale.min(other.scale).max(0);
        let (x, xe) = self.rounded(s);
        let (y, ye) = other.rounded(s);
        let x = Sci {
            a: &x,
            b: &[],
            exp: xe,
            ..*self
        };
        let y = Sci {
            a: &y,
            b: &[],
            exp: ye,
            ..*other
        };
        x.cmp_value(&y) == Ordering::Equal
    }
}

/// Kinds of partial temporal values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TemporalKind {
    Date,
    DateTime,
    Time,
}

/// A parsed date, dateTime or time, possibly partial.
///
/// `c` holds year, month, day, hour, minute, second, nanosecond; `lo..hi` is the range of
/// components present (time values start at hour; seconds include the fraction).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Temporal<'s> {
    pub(crate) kind: TemporalKind,
    pub(crate) c: [i64; 7],
    pub(crate) lo: usize,
    pub(crate) hi: usize,
    /// Fraction digits as written (after the `.`), empty when absent.
    pub(crate) frac: &'s str,
    /// Time zone offset in minutes, when given.
    pub(crate) tz: Option<i64>,
    /// Time zone as written (`Z`, `+02:00`), empty when absent.
    pub(crate) tz_text: &'s str,
}

fn take_digits(s: &str, n: usize) -> Option<(i64, &str)> {
    let d = s.get(..n)?;
    if !d.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((d.parse().ok()?, &s[n..]))
}

/// `hh(:mm(:ss(.f+)?)?)?` into `t.c[3..]`; returns the rest.
fn parse_time_into<'s>(s: &'s str, t: &mut Temporal<'s>) -> Option<&'s str> {
    let (h, mut rest) = take_digits(s, 2)?;
    if h > 23 {
        return None;
    }
    t.c[3] = h;
    t.hi = 4;
    for (i, max) in [(4usize, 59i64), (5, 60)] {
        let Some(r) = rest.strip_prefix(':') else {
            return Some(rest);
        };
        let (v, r) = take_digits(r, 2)?;
        if v > max {
            return None;
        }
        t.c[i] = v;
        t.hi = i + 1;
        rest = r;
    }
    if let Some(r) = rest.strip_prefix('.') {
        let n = r.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return None;
        }
        t.frac = &r[..n];
        let mut nanos: i64 = 0;
        for (i, b) in r.bytes().take(9).take_while(u8::is_ascii_digit).enumerate() {
            let _ = i;
            nanos = nanos * 10 + i64::from(b - b'0');
        }
        for _ in n.min(9)..9 {
            nanos *= 10;
        }
        t.c[6] = nanos;
        rest = &r[n..];
    }
    Some(rest)
}

fn parse_tz<'s>(s: &'s str, t: &mut Temporal<'s>) -> Option<()> {
    if s.is_empty() {
        return Some(());
    }
    if s == "Z" {
        t.tz = Some(0);
        t.tz_text = s;
        return Some(());
    }
    let sign = match s.as_bytes().first()? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let (h, r) = take_digits(&s[1..], 2)?;
    let r = r.strip_prefix(':')?;
    let (m, r) = take_digits(r, 2)?;
    if !r.is_empty() || h > 14 || m > 59 {
        return None;
    }
    t.tz = Some(sign * (h * 60 + m));
    t.tz_text = s;
    Some(())
}

impl<'s> Temporal<'s> {
    fn empty(kind: TemporalKind) -> Temporal<'s> {
        Temporal {
            kind,
            c: [0, 1, 1, 0, 0, 0, 0],
            lo: if kind == TemporalKind::Time { 3 } else { 0 },
            hi: 0,
            frac: "",
            tz: None,
            tz_text: "",
        }
    }

    /// Parse a date (`YYYY(-MM(-DD)?)?`), a dateTime (date with optional `Thh:mm:ss.fff±zz:zz`)
    /// or a time (`hh:mm:ss`, optionally prefixed with `T`).
    pub(crate) fn parse(s: &'s str, kind: TemporalKind) -> Option<Temporal<'s>> {
        let mut t = Temporal::empty(kind);
        if kind == TemporalKind::Time {
            let s = s.strip_prefix('T').unwrap_or(s);
            t.hi = 3;
            let rest = parse_time_into(s, &mut t)?;
            return rest.is_empty().then_some(t);
        }
        let (y, mut rest) = take_digits(s, 4)?;
        t.c[0] = y;
        t.hi = 1;
        for (i, max) in [(1usize, 12i64), (2, 31)] {
            let Some(r) = rest.strip_prefix('-') else {
                break;
            };
            let (v, r) = take_digits(r, 2)?;
            if v < 1 || v > max {
                return None;
            }
            t.c[i] = v;
            t.hi = i + 1;
            rest = r;
        }
        if t.hi == 3 && t.c[2] > days_in_month(t.c[0], t.c[1]) {
            return None;
        }
        if kind == TemporalKind::Date {
            return rest.is_empty().then_some(t);
        }
        if let Some(r) = rest.strip_prefix('T') {
            if t.hi != 3 {
                return None;
            }
            rest = if r.is_empty() {
                r
            } else {
                parse_time_into(r, &mut t)?
            };
        }
        parse_tz(rest, &mut t)?;
        Some(t)
    }

    /// Components converted to UTC when a time zone is known and a time is present.
    fn normalized(&self) -> [i64; 7] {
        let mut c = self.c;
        if let (Some(tz), true) = (self.tz, self.kind != TemporalKind::Time && self.hi > 3) {
            let days = days_from_civil(c[0], c[1], c[2]);
            let minutes = days * 1440 + c[3] * 60 + c[4] - tz;
            let d = minutes.div_euclid(1440);
            let m = minutes.rem_euclid(1440);
            let (y, mo, da) = civil_from_days(d);
            c[0] = y;
            c[1] = mo;
            c[2] = da;
            c[3] = m / 60;
            c[4] = m % 60;
        }
        c
    }

    /// Compare; `None` when the values are of different precision and equal up to the shorter
    /// one (FHIRPath's "uncertain" result), or of incomparable kinds.
    pub(crate) fn compare(&self, other: &Temporal<'_>) -> Option<Ordering> {
        let time_a = self.kind == TemporalKind::Time;
        let time_b = other.kind == TemporalKind::Time;
        if time_a != time_b {
            return None;
        }
        let both_tz = self.tz.is_some() && other.tz.is_some();
        let (a, b) = if both_tz {
            (self.normalized(), other.normalized())
        } else {
            (self.c, other.c)
        };
        let hi = self.hi.min(other.hi);
        for i in self.lo..hi {
            match a[i].cmp(&b[i]) {
                Ordering::Equal => {}
                o => return Some(o),
            }
        }
        // Seconds include the fraction.
        if hi == 6 {
            match a[6].cmp(&b[6]) {
                Ordering::Equal => {}
                o => return Some(o),
            }
        }
        if self.hi == other.hi {
            Some(Ordering::Equal)
        } else {
            None
        }
    }

    /// The lowest (`high == false`) or highest value within the precision of this value, in
    /// lexical form with millisecond precision (dateTime and time) or day precision (date).
    pub(crate) fn boundary(&self, high: bool) -> String {
        let c = &self.c;
        let y = c[0];
        let mo = if self.hi > 1 {
            c[1]
        } else if high {
            12
        } else {
            1
        };
        let d = if self.hi > 2 {
            c[2]
        } else if high {
            days_in_month(y, mo)
        } else {
            1
        };
        let fill = |i: usize, max: i64| {
            if self.hi > i {
                c[i]
            } else if high {
                max
            } else {
                0
            }
        };
        let h = fill(3, 23);
        let mi = fill(4, 59);
        let s = fill(5, 59);
        let frac = if self.hi > 5 && !self.frac.is_empty() {
            let pad = if high { '9' } else { '0' };
            let mut f = self.frac.to_string();
            while f.len() < 3 {
                f.push(pad);
            }
            f
        } else if high {
            "999".to_string()
        } else {
            "000".to_string()
        };
        let time = format!("{h:02}:{mi:02}:{s:02}.{frac}");
        match self.kind {
            TemporalKind::Time => time,
            TemporalKind::Date => format!("{y:04}-{mo:02}-{d:02}"),
            TemporalKind::DateTime => {
                let tz = if !self.tz_text.is_empty() {
                    self.tz_text
                } else if high {
                    "-12:00"
                } else {
                    "+14:00"
                };
                format!("{y:04}-{mo:02}-{d:02}T{time}{tz}")
            }
        }
    }
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

pub(crate) fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `(year, month, day)` of a day count since 1970-01-01.
pub(crate) fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// An item viewed as a FHIRPath value.
#[derive(Clone, Debug)]
pub(crate) enum Val<'v> {
    Bool(bool),
    Int(i64),
    Dec(Decimal),
    /// A valid decimal too large for [`Decimal`] even without its trailing zeros (more than
    /// [`MAX_DIGITS`] significant digits, or more than [`MAX_PARSE_SCALE`] fraction digits), in
    /// lexical form. It compares exactly (see [`Sci`]); arithmetic on it is an error.
    BigDec(&'v str),
    /// A number whose lexical form is not a decimal.
    BadNumber,
    Str(&'v str),
    Date(&'v str),
    DateTime(&'v str),
    Time(&'v str),
    /// An object or array node.
    Node(Json<'v>),
}

/// Classify an item. `None` for JSON `null`.
pub(crate) fn val<'v>(item: &'v Item<'_>) -> Option<Val<'v>> {
    Some(match item {
        Item::Boolean(b) => Val::Bool(*b),
        Item::Integer(i) => Val::Int(*i),
        Item::Decimal(s) => decimal_val(s),
        Item::String(s) => Val::Str(s),
        Item::Date(s) => Val::Date(s),
        Item::DateTime(s) => Val::DateTime(s),
        Item::Time(s) => Val::Time(s),
        Item::Json { value, fhir_type } => match json_ref(value) {
            JsonRef::Null => return None,
            JsonRef::Bool(b) => Val::Bool(b),
            JsonRef::Number(n) => {
                let text = number_text(n);
                let s = text.as_ref();
                let is_int = !s.contains(['.', 'e', 'E']) && *fhir_type != Some("decimal");
                match (is_int, s.parse::<i64>()) {
                    (true, Ok(i)) => Val::Int(i),
                    _ => match text {
                        Cow::Borrowed(s) => decimal_val(s),
                        Cow::Owned(_) => Decimal::parse(s).map_or(Val::BadNumber, Val::Dec),
                    },
                }
            }
            JsonRef::String(s) => match fhir_type.unwrap_or("string") {
                "date" => Val::Date(s),
                "dateTime" | "instant" => Val::DateTime(s),
                "time" => Val::Time(s),
                _ => Val::Str(s),
            },
            JsonRef::Array(_) | JsonRef::Object(_) => Val::Node(*value),
        },
    })
}

/// A decimal's text as a value: exact when it fits a [`Decimal`] (without its trailing zeros
/// if need be), [`Val::BigDec`] when not.
fn decimal_val(s: &str) -> Val<'_> {
    if let Some(d) = Decimal::parse(s) {
        return Val::Dec(d);
    }
    // Rare: only texts with very many digits get here.
    match Sci::parse(s) {
        Some(x) => Decimal::from_sci(x).map_or(Val::BigDec(s), Val::Dec),
        None => Val::BadNumber,
    }
}

/// Exact order of two numbers when one of them is a [`Val::BigDec`].
fn cmp_big(a: &Val<'_>, b: &Val<'_>) -> Option<Ordering> {
    let (mut x, mut y) = ([0u8; SCI_BUF], [0u8; SCI_BUF]);
    Some(sci(a, &mut x)?.cmp_value(&sci(b, &mut y)?))
}

/// A number as a [`Sci`] (an `i64` or [`Decimal`] is written into `buf`).
fn sci<'b>(v: &Val<'b>, buf: &'b mut [u8; SCI_BUF]) -> Option<Sci<'b>> {
    match v {
        Val::Int(i) => Some(Decimal::from_i64(*i).sci(buf)),
        Val::Dec(d) => Some(d.sci(buf)),
        Val::BigDec(s) => Sci::parse(s),
        _ => None,
    }
}

fn num(v: &Val<'_>) -> Option<Decimal> {
    match v {
        Val::Int(i) => Some(Decimal::from_i64(*i)),
        Val::Dec(d) => Some(*d),
        _ => None,
    }
}

/// Temporal view of a value; strings are parsed as the `hint` kind (a JSON string compared with
/// a date literal is read as a date).
fn temporal<'v>(v: &Val<'v>, hint: Option<TemporalKind>) -> Option<Temporal<'v>> {
    match v {
        Val::Date(s) => Temporal::parse(s, TemporalKind::Date)
            .or_else(|| Temporal::parse(s, TemporalKind::DateTime)),
        Val::DateTime(s) => Temporal::parse(s, TemporalKind::DateTime),
        Val::Time(s) => Temporal::parse(s, TemporalKind::Time),
        Val::Str(s) => {
            let kind = hint?;
            let kind = if kind == TemporalKind::Date && s.contains('T') {
                TemporalKind::DateTime
            } else {
                kind
            };
            Temporal::parse(s, kind)
        }
        _ => None,
    }
}

fn temporal_kind(v: &Val<'_>) -> Option<TemporalKind> {
    match v {
        Val::Date(_) => Some(TemporalKind::Date),
        Val::DateTime(_) => Some(TemporalKind::DateTime),
        Val::Time(_) => Some(TemporalKind::Time),
        _ => None,
    }
}

/// Ordering of two values; `None` when not comparable (different kinds, or uncertain
/// temporal precision).
pub(crate) fn compare(a: &Val<'_>, b: &Val<'_>) -> Option<Ordering> {
    if let (Some(x), Some(y)) = (num(a), num(b)) {
        return Some(x.cmp_value(y));
    }
    match (a, b) {
        (Val::BigDec(_), _) | (_, Val::BigDec(_)) => cmp_big(a, b),
        (Val::Str(x), Val::Str(y)) => Some(x.cmp(y)),
        _ => {
            let hint = temporal_kind(a).or_else(|| temporal_kind(b))?;
            let x = temporal(a, Some(hint))?;
            let y = temporal(b, Some(hint))?;
            x.compare(&y)
        }
    }
}

/// FHIRPath `=` on two single values: `Some(bool)`, or `None` when the answer is empty
/// (temporal values of different precision).
pub(crate) fn equals(a: &Val<'_>, b: &Val<'_>) -> Option<bool> {
    if let (Some(x), Some(y)) = (num(a), num(b)) {
        return Some(x.cmp_value(y) == Ordering::Equal);
    }
    match (a, b) {
        (Val::BigDec(_), _) | (_, Val::BigDec(_)) => {
            Some(cmp_big(a, b).is_some_and(|o| o == Ordering::Equal))
        }
        (Val::Bool(x), Val::Bool(y)) => Some(x == y),
        (Val::Str(x), Val::Str(y)) => Some(x == y),
        (Val::Node(x), Val::Node(y)) => Some(json_equal(*x, *y)),
        _ => {
            let Some(hint) = temporal_kind(a).or_else(|| temporal_kind(b)) else {
                return Some(false);
            };
            match (temporal(a, Some(hint)), temporal(b, Some(hint))) {
                (Some(x), Some(y)) => {
                    if (x.kind == TemporalKind::Time) != (y.kind == TemporalKind::Time) {
                        return Some(false);
                    }
                    x.compare(&y).map(|o| o == Ordering::Equal)
                }
                // A string that is not a valid date is simply not equal.
                _ => Some(false),
            }
        }
    }
}

/// Deep equality of JSON nodes with numbers compared by value.
fn json_equal(a: Json<'_>, b: Json<'_>) -> bool {
    match (json_ref(a), json_ref(b)) {
        (JsonRef::Number(x), JsonRef::Number(y)) => {
            let (x, y) = (number_text(x), number_text(y));
            match (Decimal::parse(&x), Decimal::parse(&y)) {
                (Some(p), Some(q)) => p.cmp_value(q) == Ordering::Equal,
                _ => match (Sci::parse(&x), Sci::parse(&y)) {
                    (Some(p), Some(q)) => p.cmp_value(&q) == Ordering::Equal,
                    _ => x == y,
                },
            }
        }
        (JsonRef::Array(x), JsonRef::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y.iter()).all(|(p, q)| json_equal(p, q))
        }
        (JsonRef::Object(x), JsonRef::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_equal(v, w)))
        }
        (JsonRef::Null, JsonRef::Null) => true,
        (JsonRef::Bool(x), JsonRef::Bool(y)) => x == y,
        (JsonRef::String(x), JsonRef::String(y)) => x == y,
        _ => false,
    }
}

/// Normalise a string for `~`: trimmed, lower-cased, inner whitespace collapsed.
fn equiv_text(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// FHIRPath `~` on two single values.
pub(crate) fn equivalent(a: &Val<'_>, b: &Val<'_>) -> bool {
    if let (Some(x), Some(y)) = (num(a), num(b)) {
        // Compare at the precision of the less precise operand.
        let s = x.scale.min(y.scale);
        return x.round_to(s).cmp_value(y.round_to(s)) == Ordering::Equal;
    }
    match (a, b) {
        (Val::BigDec(_), _) | (_, Val::BigDec(_)) => {
            let (mut p, mut q) = ([0u8; SCI_BUF], [0u8; SCI_BUF]);
            match (sci(a, &mut p), sci(b, &mut q)) {
                (Some(x), Some(y)) => x.equivalent(&y),
                _ => false,
            }
        }
        (Val::Str(x), Val::Str(y)) => equiv_text(x) == equiv_text(y),
        _ => equals(a, b).unwrap_or(false),
    }
}

/// Equality used by `distinct`, `union`, `in`: like `=` but uncertain counts as unequal.
pub(crate) fn items_equal(a: &Item<'_>, b: &Item<'_>) -> bool {
    match (val(a), val(b)) {
        (Some(x), Some(y)) => equals(&x, &y).unwrap_or(false),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        Decimal::parse(s).expect("decimal")
    }

    impl Decimal {
        fn neg(self) -> Decimal {
            Decimal {
                mantissa: -self.mantissa,
                ..self
            }
        }
    }

    #[test]
    fn decimal_parse_and_print() {
        for s in ["0", "1.50", "-0.05", "123.456", "-7", "0.001"] {
            assert_eq!(d(s).to_string(), s);
        }
        assert_eq!(d("1.5e3").to_string(), "1500");
        assert_eq!(d("1.5E-2").to_string(), "0.015");
        assert_eq!(d("+2").to_string(), "2");
        assert!(Decimal::parse("abc").is_none());
        assert!(Decimal::parse("").is_none());
        assert!(Decimal::parse(".").is_none());
        assert!(Decimal::parse("1e99999999999").is_none());
        assert!(Decimal::parse("1".repeat(50).as_str()).is_none());
    }

    #[test]
    fn decimals_of_any_size_compare_exactly() {
        let x = |s: &'static str| Sci::parse(s).expect("decimal");
        let c = |a: &'static str, b: &'static str| x(a).cmp_value(&x(b));
        assert_eq!(c("1.0", "1.00"), Ordering::Equal);
        assert_eq!(c("15e-1", "1.50"), Ordering::Equal);
        assert_eq!(c("-0.0", "0"), Ordering::Equal);
        assert_eq!(
            c("0.1000000000000000000000000000000000000000", "0.1"),
            Ordering::Equal
        );
        assert_eq!(c("1e-70", "1e-69"), Ordering::Less);
        assert_eq!(c("1e-70", "0"), Ordering::Greater);
        assert_eq!(c("-1e-70", "0"), Ordering::Less);
        assert_eq!(c("-2", "-10"), Ordering::Greater);
        assert_eq!(c("100", "1e2"), Ordering::Equal);
        assert_eq!(c("0.12", "0.123"), Ordering::Less);
        assert_eq!(c("-0.12", "-0.123"), Ordering::Greater);
        let big = "123456789012345678901234567890.123456789";
        assert!(Decimal::parse(big).is_none());
        assert!(matches!(decimal_val(big), Val::BigDec(_)));
        assert!(matches!(
            decimal_val("0.1000000000000000000000000000000000000000"),
            Val::Dec(Decimal {
                mantissa: 1,
                scale: 1
            })
        ));
        assert!(matches!(decimal_val("1e-70"), Val::BigDec(_)));
        assert!(matches!(decimal_val("1e-70x"), Val::BadNumber));
        assert_eq!(
            compare(&decimal_val(big), &Val::Int(1)),
            Some(Ordering::Greater)
        );
        assert_eq!(
            equals(
                &decimal_val(big),
                &decimal_val("123456789012345678901234567890.1234567890")
            ),
            Some(true)
        );
        assert_eq!(equals(&decimal_val(big), &Val::Str(big)), Some(false));
        // Values too far apart to align in an i128 compare by their digits, not as f64.
        let b = Decimal {
            mantissa: i128::MAX,
            scale: 1,
        };
        let a = Decimal {
            mantissa: i128::MAX / 10 + 1,
            scale: 0,
        };
        assert_eq!(a.cmp_value(b), Ordering::Greater);
        assert_eq!(b.cmp_value(a), Ordering::Less);
        let (a, b) = (a.neg(), b.neg());
        assert_eq!(a.cmp_value(b), Ordering::Less);
        // `~` rounds to the less precise operand.
        assert!(x(big).equivalent(&x("123456789012345678901234567890.1234568")));
        assert!(!x(big).equivalent(&x("123456789012345678901234567890.1234567")));
        assert!(x("0.96").equivalent(&x("1.0")));
        assert!(x("0.4").equivalent(&x("0")));
    }

    #[test]
    fn decimal_arithmetic() {
        assert_eq!(
            d("0.1").add(d("0.2")).map(|x| x.to_string()),
            Some("0.3".into())
        );
        assert_eq!(
            d("1.0").add(d("1")).map(|x| x.to_string()),
            Some("2.0".into())
        );
        assert_eq!(
            d("3").sub(d("1.25")).map(|x| x.to_string()),
            Some("1.75".into())
        );
        assert_eq!(
            d("1.5").mul(d("2")).map(|x| x.to_string()),
            Some("3.0".into())
        );
        assert_eq!(
            d("3").div(d("2")).map(|x| x.to_string()),
            Some("1.5".into())
        );
        assert_eq!(
            d("6").div(d("3")).map(|x| x.to_string()),
            Some("2.0".into())
        );
        assert_eq!(
            d("1").div(d("3")).map(|x| x.to_string()),
            Some("0.3333333333333333".into())
        );
        assert_eq!(
            d("-2").div(d("3")).map(|x| x.to_string()),
            Some("-0.6666666666666667".into())
        );
        assert!(d("1").div(d("0")).is_none());
        assert_eq!(d("1.0").cmp_value(d("1")), Ordering::Equal);
        assert_eq!(d("-1.5").cmp_value(d("1")), Ordering::Less);
        assert_eq!(d("2.345").round_to(2).to_string(), "2.35");
        assert_eq!(d("-2.345").round_to(2).to_string(), "-2.35");
        assert_eq!(d("-2.341").floor_ceil_to(2, false).to_string(), "-2.35");
        assert_eq!(d("2.341").floor_ceil_to(2, true).to_string(), "2.35");
        assert_eq!(
            d("7").div_mod(d("2")).map(|(q, r)| (q, r.to_string())),
            Some((3, "1".into()))
        );
        assert_eq!(d("3.0").to_i64_exact(), Some(3));
        assert_eq!(d("3.5").to_i64_exact(), None);
    }

    #[test]
    fn temporal_parse() {
        let t = Temporal::parse("2015-02-07T13:28:17.239+02:00", TemporalKind::DateTime)
            .expect("parses");
        assert_eq!(t.hi, 6);
        assert_eq!(t.c[6], 239_000_000);
        assert_eq!(t.tz, Some(120));
        assert!(Temporal::parse("2015-02-30", TemporalKind::Date).is_none());
        assert!(Temporal::parse("2015-13", TemporalKind::Date).is_none());
        assert!(Temporal::parse("2015-02-07T", TemporalKind::Date).is_none());
        assert!(Temporal::parse("12:34:00", TemporalKind::Time).is_some());
        assert!(Temporal::parse("T12", TemporalKind::Time).is_some());
        assert!(Temporal::parse("25:00", TemporalKind::Time).is_none());
        assert!(Temporal::parse("2015-02-07T13:28:17.", TemporalKind::DateTime).is_none());
        assert!(Temporal::parse("2015-02-07T13:28Q", TemporalKind::DateTime).is_none());
    }

    #[test]
    fn temporal_compare() {
        let p = |s: &'static str, k| Temporal::parse(s, k).expect("parses");
        use TemporalKind::*;
        assert_eq!(
            p("2015-02-07T13:28:17+02:00", DateTime).compare(&p("2015-02-07T11:28:17Z", DateTime)),
            Some(Ordering::Equal)
        );
        assert_eq!(
            p("2015-02-07T00:30:00+01:00", DateTime).compare(&p("2015-02-06T23:30:00Z", DateTime)),
            Some(Ordering::Equal)
        );
        assert_eq!(p("2015", Date).compare(&p("2015-02", Date)), None);
        assert_eq!(
            p("2014", Date).compare(&p("2015-02", Date)),
            Some(Ordering::Less)
        );
        assert_eq!(
            p("12:00:00", Time).compare(&p("12:00:00.000", Time)),
            Some(Ordering::Equal)
        );
        assert_eq!(p("12:00", Time).compare(&p("12:00:01", Time)), None);
        assert_eq!(p("12:00", Time).compare(&p("2012", Date)), None);
    }

    #[test]
    fn boundaries() {
        use TemporalKind::*;
        let b = |s: &'static str, k, h| Temporal::parse(s, k).expect("parses").boundary(h);
        assert_eq!(b("1970-06", Date, false), "1970-06-01");
        assert_eq!(b("1970-06", Date, true), "1970-06-30");
        assert_eq!(b("2020-02", Date, true), "2020-02-29");
        assert_eq!(b("1970", Date, true), "1970-12-31");
        assert_eq!(
            b("2010-10-10", DateTime, false),
            "2010-10-10T00:00:00.000+14:00"
        );
        assert_eq!(
            b("2010-10-10", DateTime, true),
            "2010-10-10T23:59:59.999-12:00"
        );
        assert_eq!(
            b("2010-10-10T10:30Z", DateTime, true),
            "2010-10-10T10:30:59.999Z"
        );
        assert_eq!(b("12:34:00", Time, false), "12:34:00.000");
        assert_eq!(b("12:34:00", Time, true), "12:34:00.999");
        assert_eq!(b("12:34:00.5", Time, true), "12:34:00.599");
        assert_eq!(b("12", Time, true), "12:59:59.999");
    }

    #[test]
    fn civil_roundtrip() {
        for days in [-800_000, -1, 0, 1, 365, 10_957, 19_000, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn equality_rules() {
        let s = Val::Str("2016-11-12");
        assert_eq!(equals(&s, &Val::Date("2016-11-12")), Some(true));
        assert_eq!(equals(&s, &Val::DateTime("2016-11-12")), Some(true));
        assert_eq!(equals(&Val::Str("x"), &Val::Date("2016")), Some(false));
        assert_eq!(equals(&Val::Int(1), &Val::Dec(d("1.0"))), Some(true));
        assert_eq!(equals(&Val::Int(1), &Val::Str("1")), Some(false));
        assert_eq!(equals(&Val::Date("2016"), &Val::Date("2016-01")), None);
        assert!(equivalent(&Val::Str(" A  b"), &Val::Str("a b")));
        assert!(equivalent(&Val::Dec(d("1.0")), &Val::Dec(d("1.04"))));
        assert_eq!(
            compare(&Val::Str("a"), &Val::Str("b")),
            Some(Ordering::Less)
        );
        assert_eq!(compare(&Val::Str("a"), &Val::Int(1)), None);
    }
}
