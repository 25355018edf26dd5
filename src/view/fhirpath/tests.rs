//! Behaviour tests for the public API, the SQL-on-FHIR suite expressions, and fuzzing.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::*;
use crate::view::json::{Json, JsonRef, json_ref, leak_json};

/// The evaluator's document for a serde_json test value.
fn dom(v: &Value) -> Json<'static> {
    leak_json(&v.to_string()).expect("valid JSON")
}

/// `serde_json::json!`, as the evaluator's document.
macro_rules! json {
    ($($t:tt)+) => {
        dom(&serde_json::json!($($t)+))
    };
}

fn patient() -> Json<'static> {
    json!({
        "resourceType": "Patient",
        "id": "pt1",
        "active": true,
        "gender": "male",
        "birthDate": "1970-06",
        "deceasedBoolean": false,
        "name": [
            {"use": "official", "family": "f1", "given": ["g1", "g2"]},
            {"use": "maiden", "family": "f2", "given": ["g3"]}
        ],
        "telecom": [{"system": "phone", "value": "555"}],
        "extension": [
            {"url": "http://x/birthsex", "valueCode": "F"},
            {"url": "http://x/race", "extension": [
                {"url": "ombCategory", "valueCoding": {"code": "2106-3"}},
                {"url": "text", "valueString": "Mixed"}
            ]}
        ],
        "link": [
            {"other": {"reference": "Patient/pt1"}},
            {"other": {"reference": "Organization/o1"}}
        ]
    })
}

fn constants() -> Constants {
    let mut c = Constants::new();
    c.insert(
        "use",
        Literal::String {
            fhir_type: "code".into(),
            value: "official".into(),
        },
    );
    c.insert("i", Literal::Integer(1));
    c.insert("d", Literal::Decimal("1.2".into()));
    c.insert("bd", Literal::Date("1970-06".into()));
    c
}

/// Evaluate `src` on `res` and render the result as JSON-ish text.
fn run_on(res: &Json<'_>, src: &str) -> Result<Vec<String>, FhirPathError> {
    let expr = Expression::compile(src, &constants())?;
    let env = Env {
        resource: *res,
        row_index: 7,
    };
    let out = expr.evaluate(&[Item::json(res)], &env)?;
    Ok(out.iter().map(render).collect())
}

fn render(i: &Item<'_>) -> String {
    match i {
        Item::Json { value, .. } => match json_ref(value) {
            JsonRef::String(s) => s.to_string(),
            _ => value.to_string(),
        },
        Item::Boolean(b) => b.to_string(),
        Item::Integer(n) => n.to_string(),
        Item::Decimal(s) | Item::String(s) | Item::Date(s) | Item::DateTime(s) | Item::Time(s) => {
            s.to_string()
        }
    }
}

fn run(src: &str) -> Vec<String> {
    match run_on(&patient(), src) {
        Ok(v) => v,
        Err(e) => panic!("{src}: {e}"),
    }
}

fn one(src: &str) -> String {
    let v = run(src);
    assert_eq!(v.len(), 1, "{src} gave {v:?}");
    v.into_iter().next().unwrap_or_default()
}

fn empty(src: &str) {
    let v = run(src);
    assert!(v.is_empty(), "{src} gave {v:?}");
}

#[test]
fn navigation() {
    assert_eq!(one("id"), "pt1");
    assert_eq!(run("name.family"), ["f1", "f2"]);
    assert_eq!(run("name.given"), ["g1", "g2", "g3"]);
    assert_eq!(run("Patient.name.family"), ["f1", "f2"]);
    empty("Observation.name");
    empty("missing");
    empty("name.missing.deeper");
    empty("id.length.foo");
    assert_eq!(one("name[1].family"), "f2");
    assert_eq!(one("name[%i].family"), "f2");
    empty("name[2].family");
    empty("name[-1]");
    assert_eq!(one("`id`"), "pt1");
    assert_eq!(one("%resource.id"), "pt1");
    assert_eq!(one("%rowIndex"), "7");
    assert_eq!(one("$this.id"), "pt1");
}

#[test]
fn choice_types() {
    assert_eq!(one("deceased"), "false");
    assert_eq!(one("deceased.ofType(boolean)"), "false");
    empty("deceased.ofType(dateTime)");
    assert_eq!(
        one("extension('http://x/birthsex').value.ofType(code)"),
        "F"
    );
    // A code is a string.
    assert_eq!(
        one("extension('http://x/birthsex').value.ofType(string)"),
        "F"
    );
    empty("extension('http://x/birthsex').value.ofType(id)");
    assert_eq!(
        one("extension('http://x/race').extension('ombCategory').value.ofType(Coding).code"),
        "2106-3"
    );
    // Untyped primitives match by JSON kind.
    assert_eq!(one("gender.ofType(code)"), "male");
    assert_eq!(one("gender.ofType(FHIR.string)"), "male");
    assert_eq!(one("gender.ofType(System.String)"), "male");
    empty("gender.ofType(integer)");
    empty("name.ofType(HumanName)");
    assert_eq!(one("active.ofType(boolean)"), "true");
    assert_eq!(one("ofType(Patient).id"), "pt1");
    assert_eq!(one("ofType(Resource).id"), "pt1");
    let obs = leak_json(
        r#"{"resourceType": "Observation", "valueQuantity": {"value": 1.50},
            "effectiveInstant": "2015-02-07T13:28:17.239+02:00",
            "component": [{"valueString": "a"}, {"valueInteger": 3}]}"#,
    )
    .expect("json");
    let r = |s: &str| run_on(&obs, s).unwrap_or_else(|e| panic!("{s}: {e}"));
    assert_eq!(r("value.ofType(Quantity).value"), ["1.50"]);
    assert_eq!(r("value.value"), ["1.50"]);
    assert_eq!(r("value.ofType(Quantity).value.ofType(decimal)"), ["1.50"]);
    assert!(r("value.ofType(Range)").is_empty());
    assert_eq!(r("component.value.ofType(integer)"), ["3"]);
    assert_eq!(r("component.value.ofType(string)"), ["a"]);
    assert_eq!(r("component.value"), ["a", "3"]);
    assert_eq!(r("value is Quantity"), ["true"]);
    assert_eq!(r("value.is(Age)"), ["false"]);
    assert_eq!(r("(value as Quantity).value"), ["1.50"]);
    assert_eq!(
        r("effective.ofType(instant) = @2015-02-07T11:28:17.239Z"),
        ["true"]
    );
    assert_eq!(r("effective.ofType(dateTime)").len(), 0);
}

#[test]
fn item_types() {
    let obs = json!({"resourceType": "Observation", "valueQuantity": {"value": 1}});
    let env = Env::new(obs);
    let e = Expression::compile("value", &Constants::new()).expect("compiles");
    let out = e.evaluate(&[Item::json(obs)], &env).expect("evaluates");
    assert!(matches!(
        out.as_slice(),
        [Item::Json {
            fhir_type: Some("Quantity"),
            ..
        }]
    ));
    let e = Expression::compile("value.value.ofType(integer)", &Constants::new()).expect("ok");
    let out = e.evaluate(&[Item::json(obs)], &env).expect("evaluates");
    assert!(matches!(
        out.as_slice(),
        [Item::Json {
            fhir_type: Some("integer"),
            ..
        }]
    ));
}

#[test]
fn existence_functions() {
    assert_eq!(one("name.exists()"), "true");
    assert_eq!(one("missing.exists()"), "false");
    assert_eq!(one("name.exists(use = 'maiden')"), "true");
    assert_eq!(one("name.exists(use = 'nickname')"), "false");
    assert_eq!(one("name.empty()"), "false");
    assert_eq!(one("missing.empty()"), "true");
    assert_eq!(one("name.count()"), "2");
    assert_eq!(one("missing.count()"), "0");
    assert_eq!(one("name.given.first()"), "g1");
    assert_eq!(one("name.given.last()"), "g3");
    assert_eq!(run("name.given.tail()"), ["g2", "g3"]);
    assert_eq!(run("name.given.skip(1)"), ["g2", "g3"]);
    assert_eq!(run("name.given.take(2)"), ["g1", "g2"]);
    empty("missing.first()");
    assert_eq!(one("name.all(family.exists())"), "true");
    assert_eq!(one("name.all(use = 'official')"), "false");
    assert_eq!(one("missing.all(false)"), "true");
    assert_eq!(one("(true | false).anyTrue()"), "true");
    assert_eq!(one("(true | false).allTrue()"), "false");
    assert_eq!(one("(1 | 1 | 2).count()"), "2");
    assert_eq!(one("(1).combine(1).count()"), "2");
    assert_eq!(one("(1 | 2).distinct().count()"), "2");
    assert_eq!(one("(1 | 2).isDistinct()"), "true");
    assert_eq!(one("id.single()"), "pt1");
    assert_eq!(one("id.hasValue()"), "true");
    assert_eq!(one("name.first().hasValue()"), "false");
    assert_eq!(run("(1 | 2 | 3).intersect(2 | 3 | 4)"), ["2", "3"]);
    assert_eq!(run("(1 | 2 | 3).exclude(2)"), ["1", "3"]);
    assert_eq!(one("(1 | 2).subsetOf(1 | 2 | 3)"), "true");
    assert_eq!(one("(1 | 2).supersetOf(1 | 2 | 3)"), "false");
}

#[test]
fn where_select_repeat() {
    assert_eq!(run("name.where(use = 'official').family"), ["f1"]);
    assert_eq!(run("name.where(use = %use).family"), ["f1"]);
    assert_eq!(run("name.where($this.use = 'maiden').family"), ["f2"]);
    assert!(run("name.where(false)").is_empty());
    assert!(run("name.where({})").is_empty());
    // A single non-boolean item counts as true.
    assert_eq!(run("name.where(family).family"), ["f1", "f2"]);
    assert!(run_on(&patient(), "name.where(given)").is_err());
    assert_eq!(run("name.select(given.first())"), ["g1", "g3"]);
    assert_eq!(run("name.select($index)"), ["0", "1"]);
    let q = json!({"item": [{"linkId": "1", "item": [{"linkId": "1.1"}]}, {"linkId": "2"}]});
    let r = run_on(&q, "repeat(item).linkId").expect("ok");
    assert_eq!(r, ["1", "2", "1.1"]);
    // The input is not part of the result.
    assert_eq!(run_on(&q, "repeat(item).count()").expect("ok"), ["3"]);
    assert_eq!(run_on(&q, "item.repeat(item).linkId").expect("ok"), ["1.1"]);
    assert!(run_on(&q, "descendants().linkId").expect("ok").len() == 3);
    assert_eq!(run_on(&q, "item.children().count()").expect("ok"), ["3"]);
    // Self-feeding repeat stops on seen items.
    assert_eq!(run_on(&q, "repeat($this).count()").expect("ok"), ["1"]);
    assert_eq!(run_on(&q, "repeat(1).count()").expect("ok"), ["1"]);
}

#[test]
fn booleans_three_valued() {
    assert_eq!(one("true and true"), "true");
    assert_eq!(one("true and false"), "false");
    empty("true and {}");
    assert_eq!(one("false and {}"), "false");
    assert_eq!(one("{} and false"), "false");
    assert_eq!(one("true or {}"), "true");
    empty("false or {}");
    assert_eq!(one("true xor false"), "true");
    empty("true xor {}");
    assert_eq!(one("false implies {}"), "true");
    empty("true implies {}");
    assert_eq!(one("{} implies true"), "true");
    assert_eq!(one("true.not()"), "false");
    empty("{}.not()");
    assert_eq!(one("(gender = 'male').not()"), "false");
    assert_eq!(one("active.exists() and active = true"), "true");
    assert_eq!(
        one("gender = 'male' and deceased.ofType(boolean) = false"),
        "true"
    );
    assert!(run_on(&patient(), "name.family and true").is_err());
}

#[test]
fn equality_and_comparison() {
    assert_eq!(one("1 = 1.0"), "true");
    assert_eq!(one("1 != 2"), "true");
    assert_eq!(one("'a' = 'a'"), "true");
    assert_eq!(one("'a' = 'A'"), "false");
    assert_eq!(one("'a' ~ 'A'"), "true");
    assert_eq!(one("'a' !~ 'A'"), "false");
    assert_eq!(one("{} ~ {}"), "true");
    empty("{} = 1");
    empty("1 = {}");
    empty("missing = 'x'");
    empty("missing != 'x'");
    assert_eq!(one("1 = 'a'"), "false");
    assert_eq!(one("name.family = ('f1' | 'f2')"), "true");
    assert_eq!(one("name.family = 'f1'"), "false");
    assert_eq!(one("gender = %use"), "false");
    assert_eq!(one("name.first().use = %use"), "true");
    assert_eq!(one("birthDate = %bd"), "true");
    assert_eq!(one("birthDate = @1970-06"), "true");
    empty("birthDate = @1970-06-01");
    assert_eq!(one("birthDate < @1971"), "true");
    assert_eq!(
        one("@2020-01-01T10:00:00+01:00 = @2020-01-01T09:00:00Z"),
        "true"
    );
    assert_eq!(one("@T10:00 < @T11:00"), "true");
    assert_eq!(one("1 < 2"), "true");
    assert_eq!(one("2.5 >= 2.50"), "true");
    assert_eq!(one("2 <= 1.5"), "false");
    assert_eq!(one("1.5 > 1"), "true");
    assert_eq!(one("'abc' < 'abd'"), "true");
    empty("1 < 'a'");
    empty("missing < 1");
    assert!(run_on(&patient(), "name.family < 'z'").is_err());
    assert_eq!(one("'f1' in name.family"), "true");
    assert_eq!(one("name.family contains 'f3'"), "false");
    empty("{} in name.family");
    assert_eq!(run("name.family | name.family"), ["f1", "f2"]);
    assert_eq!(one("name.first() = name.first()"), "true");
    assert_eq!(one("name.first() = name.last()"), "false");
}

/// FHIR decimals have arbitrary precision: values with more digits than the `i128` engine
/// holds still compare exactly, and arithmetic on them fails with an error naming the size.
#[test]
fn big_decimals_compare_exactly() {
    let obs = |v: &str| {
        leak_json(&format!(
            r#"{{"resourceType":"Observation","valueQuantity":{{"value":{v}}}}}"#
        ))
        .expect("valid JSON")
    };
    let big = obs("123456789012345678901234567890.123456789");
    let padded = obs("0.1000000000000000000000000000000000000000");
    let tiny = obs("1e-70");
    let r = |res: &Json<'_>, s: &str| {
        run_on(res, &format!("value.ofType(Quantity).value{s}"))
            .unwrap_or_else(|e| panic!("{s}: {e}"))
    };
    assert_eq!(r(&big, " > 1"), ["true"]);
    assert_eq!(
        r(&big, " < 123456789012345678901234567890.12345679"),
        ["true"]
    );
    assert_eq!(
        r(&big, " = 123456789012345678901234567890.1234567890"),
        ["true"]
    );
    assert_eq!(
        r(&big, " = 123456789012345678901234567890.123456788"),
        ["false"]
    );
    assert_eq!(r(&big, " != 1"), ["true"]);
    assert_eq!(
        r(&big, " ~ 123456789012345678901234567890.12345678900"),
        ["true"]
    );
    assert_eq!(
        r(&big, " ~ 123456789012345678901234567890.1234568"),
        ["true"]
    );
    assert_eq!(
        r(&big, " ~ 123456789012345678901234567890.1234567"),
        ["false"]
    );
    assert_eq!(r(&big, " is Decimal"), ["true"]);
    assert_eq!(
        r(&big, ".toDecimal()"),
        ["123456789012345678901234567890.123456789"]
    );
    assert_eq!(
        r(&big, " in (1 | 123456789012345678901234567890.123456789)"),
        ["true"]
    );
    assert_eq!(r(&big, ".where($this >= 0).exists()"), ["true"]);
    assert_eq!(r(&padded, " > 1"), ["false"]);
    assert_eq!(r(&padded, " = 0.1"), ["true"]);
    assert_eq!(r(&padded, " = 0.10"), ["true"]);
    assert_eq!(r(&padded, " + 0"), ["0.1"]);
    assert_eq!(r(&padded, " * 2"), ["0.2"]);
    assert_eq!(r(&tiny, " > 0"), ["true"]);
    assert_eq!(r(&tiny, " < 0.0000000001"), ["true"]);
    assert_eq!(r(&tiny, " = 0"), ["false"]);
    assert_eq!(r(&tiny, ".where($this >= 0).exists()"), ["true"]);
    assert_eq!(
        one("-123456789012345678901234567890.123456789 < -1"),
        "true"
    );
    assert_eq!(
        one("(-123456789012345678901234567890.123456789).toString()"),
        "-123456789012345678901234567890.123456789"
    );
    for (res, e) in [
        (&big, " + 0"),
        (&big, " * 2"),
        (&tiny, " - 1"),
        (&big, ".round()"),
    ] {
        let err = run_on(res, &format!("value.ofType(Quantity).value{e}"))
            .expect_err(e)
            .to_string();
        assert!(err.contains("significant digits"), "{e}: {err}");
        assert!(!err.contains("cannot apply"), "{e}: {err}");
    }
}

/// A dateTime element's type is not in the JSON, but `toDate()` still gives its date part.
#[test]
fn date_time_elements_convert_to_their_date() {
    let mr = json!({"resourceType": "MedicationRequest", "authoredOn": "2020-05-01T10:00:00+02:00",
                    "extension": [{"url": "x", "valueString": "2020-05-01T10:00:00Z"}]});
    let r = |s: &str| run_on(&mr, s).unwrap_or_else(|e| panic!("{s}: {e}"));
    assert_eq!(r("authoredOn.toDate()"), ["2020-05-01"]);
    assert_eq!(r("authoredOn.toDate() = @2020-05-01"), ["true"]);
    assert_eq!(r("authoredOn.convertsToDate()"), ["true"]);
    assert_eq!(r("authoredOn.toDateTime()"), ["2020-05-01T10:00:00+02:00"]);
    assert_eq!(r("'2020-05-01'.toDate()"), ["2020-05-01"]);
    // A string computed by the expression converts only from `YYYY-MM-DD`.
    assert_eq!(r("'2020-05-01T10:00:00Z'.toDate()"), Vec::<String>::new());
    assert_eq!(r("authoredOn.substring(0).toDate()"), Vec::<String>::new());
    // So does an element known to be a `string`.
    assert_eq!(r("extension.value.toDate()"), Vec::<String>::new());
}

/// A plain `Reference` element is recognised by its shape (JSON has no types).
#[test]
fn plain_reference_elements_are_references() {
    let mr = json!({"resourceType": "MedicationRequest",
        "subject": {"reference": "Patient/p1", "display": "P", "_display": {"extension": []}},
        "performer": {"identifier": {"value": "x"}, "type": "Practitioner"},
        "recorder": {"display": "only a display"},
        "reasonReference": [{"reference": "Condition/c1"}],
        "code": {"coding": [{"code": "a", "display": "A"}], "text": "t"},
        "note": [{"text": "n", "authorReference": {"reference": "Patient/p1"}}]});
    let r = |s: &str| run_on(&mr, s).unwrap_or_else(|e| panic!("{s}: {e}"));
    assert_eq!(r("subject.ofType(Reference).reference"), ["Patient/p1"]);
    assert_eq!(r("subject is Reference"), ["true"]);
    assert_eq!(r("subject is FHIR.Reference"), ["true"]);
    assert_eq!(r("(subject as Reference).reference"), ["Patient/p1"]);
    assert_eq!(
        r("subject.ofType(Reference).getReferenceKey(Patient)"),
        ["p1"]
    );
    assert_eq!(r("performer is Reference"), ["true"]);
    assert_eq!(r("reasonReference.ofType(Reference).count()"), ["1"]);
    assert_eq!(r("note.author.ofType(Reference).reference"), ["Patient/p1"]);
    // Not references, or not known to be.
    assert_eq!(r("subject is Coding"), ["false"]);
    assert_eq!(r("recorder is Reference"), ["false"]);
    assert_eq!(r("code is Reference"), ["false"]);
    assert_eq!(r("code.coding is Reference"), ["false"]);
    assert_eq!(r("note is Reference"), ["false"]);
    assert_eq!(r("$this is Reference"), ["false"]);
    assert_eq!(r("subject.reference is Reference"), ["false"]);
}

#[test]
fn arithmetic() {
    assert_eq!(one("2 + 3"), "5");
    assert_eq!(one("2 - 3"), "-1");
    assert_eq!(one("2 * 3"), "6");
    assert_eq!(one("3 / 2"), "1.5");
    assert_eq!(one("6 / 3"), "2.0");
    assert_eq!(one("7 div 2"), "3");
    assert_eq!(one("7 mod 2"), "1");
    assert_eq!(one("7.5 div 2"), "3");
    assert_eq!(one("7.5 mod 2"), "1.5");
    assert_eq!(one("0.1 + 0.2"), "0.3");
    assert_eq!(one("1.0 + 1"), "2.0");
    assert_eq!(one("%d * 2"), "2.4");
    assert_eq!(one("-(1 + 2)"), "-3");
    assert_eq!(one("-%d"), "-1.2");
    assert_eq!(one("2 + 3 * 4"), "14");
    assert_eq!(one("'a' + 'b'"), "ab");
    assert_eq!(one("'a' & {}"), "a");
    assert_eq!(one("name.first().family & '-' & id"), "f1-pt1");
    empty("1 / 0");
    empty("1 div 0");
    empty("9223372036854775807 + 1");
    empty("1 + {}");
    assert!(run_on(&patient(), "1 + 'a'").is_err());
    assert!(run_on(&patient(), "name.family + 1").is_err());
    let obs = json!({"valueRange": {"low": {"value": 2}, "high": {"value": 3}}});
    let r = |s: &str| run_on(&obs, s).unwrap_or_else(|e| panic!("{s}: {e}"));
    assert_eq!(
        r("value.ofType(Range).low.value + value.ofType(Range).high.value"),
        ["5"]
    );
    assert_eq!(
        r("value.ofType(Range).high.value / value.ofType(Range).low.value"),
        ["1.5"]
    );
    assert_eq!(
        r("value.ofType(Range).high.value - value.ofType(Range).low.value"),
        ["1"]
    );
    assert_eq!(
        r("value.ofType(Range).low.value * value.ofType(Range).high.value"),
        ["6"]
    );
}

#[test]
fn strings_and_conversions() {
    assert_eq!(one("name.given.join(', ')"), "g1, g2, g3");
    assert_eq!(one("name.given.join()"), "g1g2g3");
    empty("missing.join(',')");
    assert_eq!(one("id.upper()"), "PT1");
    assert_eq!(one("'ABC'.lower()"), "abc");
    assert_eq!(one("'abc'.length()"), "3");
    assert_eq!(one("'abcdef'.substring(2, 3)"), "cde");
    assert_eq!(one("'abcdef'.substring(2)"), "cdef");
    empty("'abc'.substring(5)");
    assert_eq!(one("'abc'.startsWith('ab')"), "true");
    assert_eq!(one("'abc'.endsWith('bc')"), "true");
    assert_eq!(one("'abc'.contains('x')"), "false");
    assert_eq!(one("'abc'.indexOf('c')"), "2");
    assert_eq!(one("'a-b'.replace('-', '+')"), "a+b");
    assert_eq!(run("'a,b'.split(',')"), ["a", "b"]);
    assert_eq!(one("' a '.trim()"), "a");
    assert_eq!(run("'ab'.toChars()"), ["a", "b"]);
    assert_eq!(one("1.toString()"), "1");
    assert_eq!(one("'12'.toInteger() + 1"), "13");
    assert_eq!(one("'1.50'.toDecimal()"), "1.50");
    assert_eq!(one("'x'.convertsToInteger()"), "false");
    assert_eq!(one("'yes'.toBoolean()"), "true");
    empty("'1.5'.toInteger()");
    assert_eq!(one("birthDate.toDate() = @1970-06"), "true");
    assert_eq!(
        one("'2020-01-02T10:00:00Z'.toDateTime() = @2020-01-02T11:00:00+01:00"),
        "true"
    );
    assert_eq!(one("@2020-01-02T10:00:00Z.toDate()"), "2020-01-02");
    assert_eq!(one("'12:30'.toTime() < @T13:00"), "true");
    assert_eq!(one("'x'.convertsToDate()"), "false");
    empty("'2020-13'.toDate()");
    assert_eq!(one("id.matches('^pt[0-9]$')"), "true");
    assert_eq!(one("id.matches('x')"), "false");
    assert_eq!(one("id.matchesFull('pt')"), "false");
    assert_eq!(one("id.matchesFull('pt\\\\d')"), "true");
    assert_eq!(one("id.replaceMatches('[0-9]', '#')"), "pt#");
    assert_eq!(one("id.matches('p' + 't')"), "true");
    empty("missing.matches('x')");
    assert!(Expression::compile("id.matches('(')", &Constants::new()).is_err());
    assert!(run_on(&patient(), "id.matches('(' + '')").is_err());
    assert_eq!(one("(1 | 2 | 3).aggregate($this + $total, 0)"), "6");
    assert_eq!(
        one(
            "(3 | 1 | 2).aggregate(iif($total.empty(), $this, iif($this < $total, $this, $total)))"
        ),
        "1"
    );
    empty("{}.aggregate($this + $total)");
    assert_eq!(one("today() > @2020-01-01"), "true");
    assert_eq!(one("now() > @2020-01-01T00:00:00Z"), "true");
    assert_eq!(one("timeOfDay().toString().length()"), "12");
    assert_eq!(one("iif(active, 'a', 'b')"), "a");
    assert_eq!(one("iif(missing, 'a', 'b')"), "b");
    empty("iif(false, 'a')");
    assert_eq!(one("(-1.5).abs()"), "1.5");
    assert_eq!(one("1.5.ceiling()"), "2");
    assert_eq!(one("(-1.5).floor()"), "-2");
    assert_eq!(one("1.55.round(1)"), "1.6");
    assert_eq!(one("1.55.truncate()"), "1");
    assert_eq!(one("id.trace('x')"), "pt1");
}

/// `urn:uuid:<id>` references (Synthea bundles, some servers' exports) give `<id>`, whatever
/// type is asked for: a uuid says nothing about the type it points at.
#[test]
fn urn_uuid_references_give_their_uuid() {
    let report = json!({
        "resourceType": "DiagnosticReport",
        "id": "dr1",
        "subject": {"reference": "urn:uuid:9a1b2c3d-0000-4000-8000-00000000000a"},
        "result": [
            {"reference": "urn:uuid:5e6f7a8b-1111-4111-8111-11111111111b"},
            {"reference": "Observation/o2"},
            {"reference": "urn:oid:1.2.3"},
            {"reference": "#contained"}
        ]
    });
    let run = |src: &str| run_on(&report, src).unwrap_or_else(|e| panic!("{src}: {e}"));
    let uuid = "5e6f7a8b-1111-4111-8111-11111111111b";
    assert_eq!(run("result.getReferenceKey()"), [uuid, "o2"]);
    assert_eq!(run("result.getReferenceKey(Observation)"), [uuid, "o2"]);
    assert_eq!(run("result.getReferenceKey(Patient)"), [uuid]);
    assert_eq!(
        run("subject.getReferenceKey(Patient)"),
        ["9a1b2c3d-0000-4000-8000-00000000000a"]
    );
    assert_eq!(run("result.reference.getReferenceKey()"), [uuid, "o2"]);
    assert_eq!(
        run("result.where(getReferenceKey() = '5e6f7a8b-1111-4111-8111-11111111111b').count()"),
        ["1"]
    );
}

#[test]
fn fhir_functions() {
    assert_eq!(one("extension('http://x/birthsex').value"), "F");
    empty("extension('http://x/none')");
    assert_eq!(
        run("extension('http://x/race').extension.url"),
        ["ombCategory", "text"]
    );
    assert_eq!(one("getResourceKey()"), "pt1");
    assert_eq!(run("link.other.getReferenceKey()"), ["pt1", "o1"]);
    assert_eq!(run("link.other.getReferenceKey(Patient)"), ["pt1"]);
    assert_eq!(run("link.other.getReferenceKey('Organization')"), ["o1"]);
    empty("link.other.getReferenceKey(Observation)");
    assert_eq!(
        run("getResourceKey() = link.other.getReferenceKey(Patient)"),
        ["true"]
    );
    empty("getResourceKey() = link.other.getReferenceKey(Observation)");
    // Inside a forEach the focus is not the resource: the key is still the resource's.
    let res = patient();
    let e = Expression::compile("getResourceKey()", &Constants::new()).expect("ok");
    let env = Env::new(res);
    let JsonRef::Array(names) = json_ref(crate::view::json::member(res, "name").expect("name"))
    else {
        panic!("name is an array")
    };
    let first = names.iter().next().expect("a name");
    let out = e.evaluate(&[Item::json(first)], &env).expect("ok");
    assert_eq!(out.iter().map(render).collect::<Vec<_>>(), ["pt1"]);
}

#[test]
fn boundaries() {
    assert_eq!(one("birthDate.lowBoundary()"), "1970-06-01");
    assert_eq!(one("birthDate.highBoundary()"), "1970-06-30");
    assert_eq!(one("1.0.lowBoundary()"), "0.95");
    assert_eq!(one("1.0.highBoundary()"), "1.05");
    assert_eq!(one("1.587.lowBoundary(8)"), "1.58650000");
    assert_eq!(one("@2010-10-10.lowBoundary()"), "2010-10-10");
    assert_eq!(
        one("@2010-10-10T.lowBoundary()"),
        "2010-10-10T00:00:00.000+14:00"
    );
    assert_eq!(
        one("@2010-10-10T.highBoundary()"),
        "2010-10-10T23:59:59.999-12:00"
    );
    assert_eq!(one("@T12:34.highBoundary()"), "12:34:59.999");
    let obs = json!({"valueDateTime": "2010-10-10", "valueQuantity": {"value": 1.0},
                     "effectivePeriod": {"start": "2020-01", "end": "2020-02"}});
    let r = |s: &str| run_on(&obs, s).unwrap_or_else(|e| panic!("{s}: {e}"));
    assert_eq!(
        r("value.ofType(dateTime).lowBoundary()"),
        ["2010-10-10T00:00:00.000+14:00"]
    );
    assert_eq!(
        r("value.ofType(dateTime).highBoundary()"),
        ["2010-10-10T23:59:59.999-12:00"]
    );
    assert_eq!(r("value.ofType(Quantity).value.lowBoundary()"), ["0.95"]);
    assert_eq!(
        r("effective.ofType(Period).highBoundary()"),
        ["2020-02-29T23:59:59.999-12:00"]
    );
    let e = Expression::compile("value.ofType(dateTime).lowBoundary()", &Constants::new());
    assert_eq!(e.expect("ok").result_type(), Some("dateTime"));
}

#[test]
fn result_types() {
    let c = constants();
    let t = |s: &str| {
        Expression::compile(s, &c)
            .unwrap_or_else(|e| panic!("{s}: {e}"))
            .result_type()
            .map(str::to_string)
    };
    assert_eq!(t("name.exists()").as_deref(), Some("boolean"));
    assert_eq!(t("name.empty()").as_deref(), Some("boolean"));
    assert_eq!(t("a = b").as_deref(), Some("boolean"));
    assert_eq!(t("a and b").as_deref(), Some("boolean"));
    assert_eq!(t("(a).not()").as_deref(), Some("boolean"));
    assert_eq!(t("name.given.join(',')").as_deref(), Some("string"));
    assert_eq!(t("getResourceKey()").as_deref(), Some("string"));
    assert_eq!(t("a.getReferenceKey()").as_deref(), Some("string"));
    assert_eq!(t("%rowIndex").as_deref(), Some("integer"));
    assert_eq!(t("name.count()").as_deref(), Some("integer"));
    assert_eq!(t("value.ofType(Quantity)").as_deref(), Some("Quantity"));
    assert_eq!(t("value.ofType(FHIR.uuid)").as_deref(), Some("uuid"));
    assert_eq!(t("value.ofType(string).first()").as_deref(), Some("string"));
    assert_eq!(t("%use").as_deref(), Some("code"));
    assert_eq!(t("%d").as_deref(), Some("decimal"));
    assert_eq!(t("1 + 2").as_deref(), Some("integer"));
    assert_eq!(t("1 + 2.0").as_deref(), Some("decimal"));
    assert_eq!(t("name.family").as_deref(), None);
    assert_eq!(t("name").as_deref(), None);
    let e = Expression::compile(" id ", &c).expect("ok");
    assert_eq!(e.source(), " id ");
    assert_eq!(e.to_string(), " id ");
}

#[test]
fn errors_name_the_expression() {
    let c = Constants::new();
    for (src, want) in [
        ("name.bogus()", "unknown or unsupported function bogus()"),
        ("%missing", "unknown constant %missing"),
        ("name.first(1)", "takes 0 argument(s), got 1"),
        ("name.where()", "takes 1 argument(s), got 0"),
        ("name.", "expected a name or function"),
        ("@@", "invalid"),
        ("1 +", "unexpected end of expression"),
        ("ofType(1)", "expects a type name"),
    ] {
        let e = Expression::compile(src, &c).expect_err(src);
        let msg = e.to_string();
        assert!(msg.contains(src), "{msg}");
        assert!(msg.contains(want), "{src}: {msg}");
    }
    let res = patient();
    let e = Expression::compile("name.family.single()", &c).expect("ok");
    let err = e
        .evaluate(&[Item::json(res)], &Env::new(res))
        .expect_err("two families");
    assert!(matches!(err, FhirPathError::Eval { .. }));
    assert!(err.to_string().contains("name.family.single()"));
}

#[test]
fn deep_expressions_are_rejected_not_overflowed() {
    let c = Constants::new();
    for src in [
        format!("{}1{}", "(".repeat(100_000), ")".repeat(100_000)),
        format!("{}1", "-".repeat(100_000)),
        vec!["a"; 100_000].join("."),
        vec!["1"; 100_000].join(" + "),
        format!("{}1{}", "where(".repeat(10_000), ")".repeat(10_000)),
        format!("{}1{}", "a[".repeat(10_000), "]".repeat(10_000)),
    ] {
        assert!(
            matches!(
                Expression::compile(&src, &c),
                Err(FhirPathError::TooDeep { .. })
            ),
            "{}",
            &src[..20]
        );
    }
}

#[test]
fn deepest_allowed_expressions_evaluate_on_a_small_stack() {
    // Debug builds use large frames; the limit must leave room on a 2 MiB thread stack.
    let handle = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(|| {
            let res = json!({"a": {"a": 1}});
            let env = Env::new(res);
            let n = MAX_DEPTH - 2;
            let cases = [
                format!("{}1{}", "(".repeat(n), ")".repeat(n)),
                format!("{}1", "-".repeat(n)),
                vec!["a"; n].join("."),
                vec!["1"; n].join("+"),
                format!("{}true{}", "where(".repeat(n / 2), ")".repeat(n / 2)),
                format!("{}1{}", "iif(true, ".repeat(n / 2), ")".repeat(n / 2)),
                format!("{}1{}", "(1 + ".repeat(n / 2), ")".repeat(n / 2)),
            ];
            for src in cases {
                let e =
                    Expression::compile(&src, &Constants::new()).unwrap_or_else(|e| panic!("{e}"));
                let _ = e.evaluate(&[Item::json(res)], &env);
            }
        })
        .expect("spawn");
    assert!(handle.join().is_ok());
}

/// The module documentation's example, kept compiling here (doctests cannot name the module's
/// final path).
#[test]
fn module_doc_example() -> Result<(), FhirPathError> {
    let mut constants = Constants::new();
    constants.insert(
        "use",
        Literal::String {
            fhir_type: "code".into(),
            value: "official".into(),
        },
    );
    let expr = Expression::compile("name.where(use = %use).family.first()", &constants)?;
    let patient = json!({"resourceType": "Patient", "id": "p1",
                         "name": [{"use": "official", "family": "Doe"}]});
    let env = Env {
        resource: patient,
        row_index: 0,
    };
    let out = expr.evaluate(&[Item::json(patient)], &env)?;
    assert!(matches!(&out[..], [Item::Json { value, .. }] if value.as_str() == Some("Doe")));
    assert_eq!(expr.result_type(), None);
    assert_eq!(
        Expression::compile("name.exists()", &constants)?.result_type(),
        Some("boolean")
    );
    Ok(())
}

#[test]
fn runaway_evaluation_hits_the_work_limit() {
    // 400 nodes; the select would produce 160 000 items, over a limit of 100 000.
    let res = json!({"a": (0..200).map(|i| serde_json::json!({"b": i})).collect::<Vec<_>>()});
    let e = Expression::compile(
        "descendants().select(%resource.descendants()).count()",
        &Constants::new(),
    )
    .expect("compiles");
    let err = e
        .evaluate_with_budget(&[Item::json(res)], &Env::new(res), 100_000)
        .expect_err("too much work");
    assert!(
        e.evaluate(&[Item::json(res)], &Env::new(res)).is_ok(),
        "the default limit allows it"
    );
    assert!(err.to_string().contains("work limit"), "{err}");
}

/// A primitive's id and extensions live in its `_name` sibling (FHIR JSON): `birthDate.extension`
/// finds them, also when the value is absent (a data-absent-reason alone), and `_given` is read
/// index by index beside `given`. Complex elements (no `_name`) are unchanged.
#[test]
fn primitive_extensions_and_ids_are_found_in_the_underscore_sibling() {
    let bt = "http://hl7.org/fhir/StructureDefinition/patient-birthTime";
    let dar = "http://hl7.org/fhir/StructureDefinition/data-absent-reason";
    let res = json!({
        "resourceType": "Patient", "id": "p1",
        "birthDate": "1970-03-30",
        "_birthDate": {"id": "bd1", "extension": [
            {"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
             "valueDateTime": "1970-03-30T14:35:00+01:00"}]},
        "_gender": {"extension": [
            {"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
             "valueCode": "asked-declined"}]},
        "name": [{"family": "Chalmers", "given": ["Peter", "James"],
                  "_given": [null, {"extension": [{"url": "http://example.org/nick",
                                                    "valueString": "Jim"}]}]}],
        "maritalStatus": {"text": "M", "extension": [{"url": "http://example.org/m",
                                                      "valueBoolean": true}]},
        "extension": [{"url": "http://example.org/plain", "valueString": "root",
                       "_valueString": {"extension": [{"url": "http://example.org/onvalue",
                                                       "valueCode": "x"}]}}]
    });
    let got = |src: &str| match run_on(&res, src) {
        Ok(v) => v,
        Err(e) => panic!("{src}: {e}"),
    };
    assert_eq!(
        got(&format!(
            "birthDate.extension('{bt}').value.ofType(dateTime)"
        )),
        ["1970-03-30T14:35:00+01:00"]
    );
    assert_eq!(
        got(&format!("birthDate.extension.where(url = '{bt}').exists()")),
        ["true"]
    );
    assert_eq!(got("birthDate.id"), ["bd1"]);
    assert_eq!(
        got("birthDate"),
        ["1970-03-30"],
        "the value itself is unchanged"
    );
    assert_eq!(
        got(&format!("gender.extension('{dar}').value.ofType(code)")),
        ["asked-declined"]
    );
    assert!(got("gender").is_empty(), "no value: nothing to read");
    assert_eq!(got("name.given.extension.value.ofType(string)"), ["Jim"]);
    assert_eq!(got("name.given"), ["Peter", "James"]);
    assert_eq!(
        got("maritalStatus.extension.value.ofType(boolean)"),
        ["true"]
    );
    assert_eq!(
        got("extension('http://example.org/plain').value.extension.value.ofType(code)"),
        ["x"],
        "a choice element's sibling: `_valueString`"
    );
    assert!(got("name.family.extension").is_empty());
    // The member-chain fast path leaves these to the evaluator.
    let e = Expression::compile("birthDate.extension.url", &Constants::new()).expect("compiles");
    assert!(e.plan().is_none());
    assert!(
        Expression::compile("birthDate.value", &Constants::new())
            .expect("compiles")
            .plan()
            .is_some()
    );
}

#[test]
fn a_large_valid_resource_is_within_the_work_limit() {
    // A Patient with a million telecoms (the default `patient` view's `telecom_phone`):
    // `where` costs ~7 units per telecom, more than MAX_EVAL_WORK alone allows; the limit
    // grows with the resource, so the value is found.
    let n = 1_000_000;
    let mut telecom: Vec<_> = (0..n)
        .map(|_| serde_json::json!({"system": "email"}))
        .collect();
    telecom.push(serde_json::json!({"system": "phone", "value": "555"}));
    let res = json!({"resourceType": "Patient", "telecom": telecom});
    let e = Expression::compile(
        "telecom.where(system = 'phone').first().value",
        &Constants::new(),
    )
    .expect("compiles");
    let out = e
        .evaluate(&[Item::json(res)], &Env::new(res))
        .expect("within the limit");
    assert!(matches!(&out[..], [Item::Json { value, .. }] if value.as_str() == Some("555")));
    assert!(
        e.evaluate_with_budget(&[Item::json(res)], &Env::new(res), MAX_EVAL_WORK)
            .is_err(),
        "MAX_EVAL_WORK alone would refuse it"
    );
}

#[test]
fn expressions_are_shareable_across_threads() {
    fn assert_traits<T: Send + Sync + Clone + 'static>() {}
    assert_traits::<Expression>();
    assert_traits::<Constants>();
    fn assert_error<T: std::error::Error + Send + Sync + 'static>() {}
    assert_error::<FhirPathError>();
}

#[test]
fn keywords_as_element_names() {
    let n = json!({"text": {"div": "<div/>"}, "contains": 1, "as": 2});
    let r = |s: &str| run_on(&n, s).unwrap_or_else(|e| panic!("{s}: {e}"));
    assert_eq!(r("text.div"), ["<div/>"]);
    assert_eq!(r("`contains`"), ["1"]);
    assert_eq!(r("$this.as"), ["2"]);
    assert_eq!(r("text.div.exists() and true"), ["true"]);
}

#[test]
fn literals_and_escapes() {
    assert_eq!(one(r"'it\'s'"), "it's");
    assert_eq!(one("'a\\tb'"), "a\tb");
    assert_eq!(one("'\\u00e9'"), "\u{e9}");
    assert_eq!(one("@2020-01-01"), "2020-01-01");
    assert_eq!(one("@2020-01-01T10:00:00Z"), "2020-01-01T10:00:00Z");
    assert_eq!(one("@T12:00"), "12:00");
    assert_eq!(one("-1.50"), "-1.50");
    assert_eq!(one("{}.count()"), "0");
    assert_eq!(one("%ucum"), "http://unitsofmeasure.org");
    assert_eq!(one("id // trailing comment"), "pt1");
}

// ---------------------------------------------------------------------------------------------
// SQL-on-FHIR suite: every expression compiles; simple one-select views evaluate as expected.

fn suite_dirs() -> Vec<PathBuf> {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/sof-tests");
    let base = if base.exists() {
        base
    } else {
        // The scratch crate lives two levels below /work.
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/sof-tests")
    };
    [base.clone(), base.join("upstream-sql-on-fhir.js")]
        .into_iter()
        .filter(|d| d.is_dir())
        .collect()
}

fn suite_files() -> Vec<(PathBuf, Value)> {
    let mut out = Vec::new();
    for dir in suite_dirs() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        paths.sort();
        for p in paths {
            let Ok(text) = std::fs::read_to_string(&p) else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            if v.get("tests").is_some_and(Value::is_array) {
                out.push((p, v));
            }
        }
    }
    out
}

/// A ViewDefinition constant as a [`Literal`]; `None` when it has no `value[x]`.
fn view_constant(c: &Value) -> Option<(String, Literal)> {
    let m = c.as_object()?;
    let name = m.get("name")?.as_str()?.to_string();
    let (key, v) = m.iter().find(|(k, _)| k.starts_with("value"))?;
    let ty = key.strip_prefix("value")?;
    let mut chars = ty.chars();
    let first = chars.next()?.to_ascii_lowercase();
    let ty = format!("{first}{}", chars.as_str());
    let lit = match ty.as_str() {
        "boolean" => Literal::Boolean(v.as_bool()?),
        "integer" | "positiveInt" | "unsignedInt" => Literal::Integer(v.as_i64()?),
        "decimal" => Literal::Decimal(v.to_string()),
        "date" => Literal::Date(v.as_str()?.to_string()),
        "dateTime" | "instant" => Literal::DateTime {
            fhir_type: ty.clone(),
            value: v.as_str()?.to_string(),
        },
        "time" => Literal::Time(v.as_str()?.to_string()),
        _ => Literal::String {
            fhir_type: ty.clone(),
            value: v.as_str()?.to_string(),
        },
    };
    Some((name, lit))
}

fn view_constants(view: &Value) -> Constants {
    let mut c = Constants::new();
    for k in view["constant"].as_array().into_iter().flatten() {
        if let Some((n, l)) = view_constant(k) {
            c.insert(&n, l);
        }
    }
    c
}

/// Every FHIRPath string in a view (columns, forEach, forEachOrNull, repeat, where).
fn view_paths(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("path" | "forEach" | "forEachOrNull", Value::String(s)) => out.push(s.clone()),
                    ("repeat", Value::Array(a)) => {
                        out.extend(a.iter().filter_map(Value::as_str).map(str::to_string))
                    }
                    _ => view_paths(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| view_paths(x, out)),
        _ => {}
    }
}

#[test]
fn suite_expressions_compile() {
    let mut checked = 0;
    let mut failures = Vec::new();
    for (file, suite) in suite_files() {
        for test in suite["tests"].as_array().into_iter().flatten() {
            if test.get("expectError").and_then(Value::as_bool) == Some(true) {
                continue;
            }
            let view = &test["view"];
            let constants = view_constants(view);
            let mut paths = Vec::new();
            view_paths(view, &mut paths);
            for p in paths {
                checked += 1;
                if let Err(e) = Expression::compile(&p, &constants) {
                    failures.push(format!("{}: {}: {e}", file.display(), test["title"]));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    eprintln!("compiled {checked} suite expressions");
}

fn item_to_json(i: &Item<'_>) -> Value {
    match i {
        Item::Json { value, .. } => serde_json::from_str(&value.to_string()).expect("JSON"),
        Item::Boolean(b) => Value::Bool(*b),
        Item::Integer(n) => serde_json::json!(n),
        Item::Decimal(s) => serde_json::from_str(s).unwrap_or(Value::Null),
        Item::String(s) | Item::Date(s) | Item::DateTime(s) | Item::Time(s) => {
            Value::String(s.to_string())
        }
    }
}

fn json_matches(got: &Value, want: &Value) -> bool {
    match (got, want) {
        (Value::Number(a), Value::Number(b)) => {
            let (a, b) = (a.as_str().parse::<f64>(), b.as_str().parse::<f64>());
            matches!((a, b), (Ok(x), Ok(y)) if (x - y).abs() < 1e-9)
        }
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| json_matches(x, y))
        }
        _ => got == want,
    }
}

/// Run views made of one `select` with plain columns (optionally `where`), the shape most
/// FHIRPath-focused suite cases have, and compare rows with `expect`.
#[test]
fn suite_simple_views_evaluate() {
    let mut ran = 0;
    let mut failures = Vec::new();
    for (file, suite) in suite_files() {
        let resources: Vec<Value> = suite["resources"].as_array().cloned().unwrap_or_default();
        for test in suite["tests"].as_array().into_iter().flatten() {
            if test.get("expectError").and_then(Value::as_bool) == Some(true) {
                continue;
            }
            // The older suite expects `join()` of nothing to be ''; FHIRPath (and the newer
            // upstream suite, fn_join.json) say the result is empty.
            let title = test["title"].as_str().unwrap_or_default();
            if title.starts_with("string join") && !file.to_string_lossy().contains("upstream") {
                continue;
            }
            let view = &test["view"];
            let Some(expect) = test["expect"].as_array() else {
                continue;
            };
            let Some(selects) = view["select"].as_array() else {
                continue;
            };
            // Only flat column selects.
            let simple = selects.iter().all(|s| {
                s.as_object()
                    .is_some_and(|m| m.keys().all(|k| k == "column"))
            });
            if !simple {
                continue;
            }
            let constants = view_constants(view);
            let rtype = view["resource"].as_str().unwrap_or_default();
            let compile = |p: &str| Expression::compile(p, &constants);
            let mut rows = Vec::new();
            let mut error = None;
            'res: for res in resources.iter().filter(|r| r["resourceType"] == rtype) {
                let res = dom(res);
                let env = Env::new(res);
                let focus = [Item::json(res)];
                for w in view["where"].as_array().into_iter().flatten() {
                    let p = w["path"].as_str().unwrap_or_default();
                    match compile(p).and_then(|e| e.evaluate(&focus, &env)) {
                        Ok(v) if matches!(v.as_slice(), [Item::Boolean(true)]) => {}
                        Ok(v)
                            if matches!(
                                v.as_slice(),
                                [Item::Json { value, .. }] if matches!(json_ref(value), JsonRef::Bool(true))
                            ) => {}
                        Ok(_) => continue 'res,
                        Err(e) => {
                            error = Some(e.to_string());
                            break 'res;
                        }
                    }
                }
                let mut row = serde_json::Map::new();
                for s in selects {
                    for col in s["column"].as_array().into_iter().flatten() {
                        let name = col["name"].as_str().unwrap_or_default().to_string();
                        let p = col["path"].as_str().unwrap_or_default();
                        let out = match compile(p).and_then(|e| e.evaluate(&focus, &env)) {
                            Ok(o) => o,
                            Err(e) => {
                                error = Some(e.to_string());
                                break 'res;
                            }
                        };
                        let cell = if col["collection"].as_bool() == Some(true) {
                            Value::Array(out.iter().map(item_to_json).collect())
                        } else {
                            match out.as_slice() {
                                [] => Value::Null,
                                [one] => item_to_json(one),
                                _ => {
                                    error = Some(format!("{p}: several items"));
                                    break 'res;
                                }
                            }
                        };
                        row.insert(name, cell);
                    }
                }
                rows.push(Value::Object(row));
            }
            ran += 1;
            let title = format!("{}: {}", file.display(), test["title"]);
            if let Some(e) = error {
                failures.push(format!("{title}: error {e}"));
                continue;
            }
            let ok = rows.len() == expect.len()
                && rows.iter().zip(expect).all(|(r, e)| {
                    e.as_object().is_some_and(|em| {
                        em.iter()
                            .all(|(k, v)| json_matches(r.get(k).unwrap_or(&Value::Null), v))
                    })
                });
            if !ok {
                failures.push(format!(
                    "{title}: got {} want {}",
                    Value::Array(rows),
                    Value::Array(expect.clone())
                ));
            }
        }
    }
    eprintln!("ran {ran} simple suite views");
    assert!(failures.is_empty(), "{failures:#?}");
}

// ---------------------------------------------------------------------------------------------
// Fuzzing: nothing panics or hangs.

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    const TOKENS: &[&str] = &[
        "name",
        "value",
        "given",
        "id",
        "a",
        "Patient",
        ".",
        "(",
        ")",
        "[",
        "]",
        "{",
        "}",
        ",",
        "+",
        "-",
        "*",
        "/",
        "&",
        "|",
        "=",
        "!=",
        "~",
        "!~",
        "<",
        ">",
        "<=",
        ">=",
        "and",
        "or",
        "xor",
        "implies",
        "div",
        "mod",
        "is",
        "as",
        "in",
        "contains",
        "true",
        "false",
        "1",
        "0",
        "-1",
        "1.5",
        "9223372036854775807",
        "'x'",
        "'2020-01-01'",
        "@2020",
        "@2020-01-01T10:00Z",
        "@T12:00",
        "%rowIndex",
        "%resource",
        "$this",
        "$index",
        "$total",
        "where(",
        "exists(",
        "first()",
        "ofType(",
        "Quantity",
        "string",
        "join(",
        "lowBoundary()",
        "highBoundary()",
        "getReferenceKey(",
        "getResourceKey()",
        "extension(",
        "select(",
        "repeat(",
        "iif(",
        "substring(",
        "count()",
        "not()",
        "empty()",
        "descendants()",
        "children()",
        "distinct()",
        "toInteger()",
        "toDecimal()",
        "round(",
        "split(",
        "single()",
    ];

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|i| serde_json::json!(i)),
            "-?[0-9]{1,40}(\\.[0-9]{1,30})?(e-?[0-9]{1,3})?"
                .prop_map(|s| { serde_json::from_str::<Value>(&s).unwrap_or(Value::Null) }),
            "[a-zA-Z0-9:/#._ -]{0,20}".prop_map(Value::String),
            Just(serde_json::json!("2020-01-01T10:00:00.5+02:00")),
            Just(serde_json::json!("Patient/1")),
        ];
        leaf.prop_recursive(4, 40, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop_oneof![
                        Just("name".to_string()),
                        Just("value".to_string()),
                        Just("valueQuantity".to_string()),
                        Just("valueDateTime".to_string()),
                        Just("given".to_string()),
                        Just("id".to_string()),
                        Just("a".to_string()),
                        Just("reference".to_string()),
                        Just("extension".to_string()),
                        Just("url".to_string()),
                        Just("resourceType".to_string()),
                    ],
                    inner,
                    0..5
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Numeric and temporal expressions built from a grammar, to reach arithmetic edge cases.
    fn arith_expr() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            any::<i64>().prop_map(|i| format!("({i})")),
            "-?[0-9]{1,30}\\.[0-9]{1,30}".prop_map(|d| format!("({d})")),
            Just("0".to_string()),
            Just("0.0".to_string()),
            Just("@2020-02-29T23:59:59.999+14:00".to_string()),
            Just("@T23:59".to_string()),
            Just("@2020".to_string()),
            Just("'12.5'".to_string()),
        ];
        leaf.prop_recursive(3, 16, 2, |inner| {
            prop_oneof![
                (
                    inner.clone(),
                    prop_oneof![
                        Just("+"),
                        Just("-"),
                        Just("*"),
                        Just("/"),
                        Just("div"),
                        Just("mod"),
                        Just("<"),
                        Just("="),
                        Just("~"),
                        Just(">="),
                        Just("&"),
                        Just("|"),
                    ],
                    inner.clone()
                )
                    .prop_map(|(a, op, b)| format!("({a} {op} {b})")),
                (
                    inner,
                    prop_oneof![
                        Just("round(3)"),
                        Just("abs()"),
                        Just("ceiling()"),
                        Just("floor()"),
                        Just("truncate()"),
                        Just("lowBoundary()"),
                        Just("highBoundary(28)"),
                        Just("toInteger()"),
                        Just("toDecimal()"),
                        Just("toString()"),
                        Just("lowBoundary(0)"),
                        Just("round(30)"),
                    ]
                )
                    .prop_map(|(a, f)| format!("{a}.{f}")),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

        #[test]
        fn arithmetic_never_panics(src in arith_expr()) {
            let res = json!({});
            if let Ok(e) = Expression::compile(&src, &Constants::new()) {
                let _ = e.evaluate(&[Item::json(res)], &Env::new(res));
            }
        }

        #[test]
        fn arbitrary_strings_never_panic(s in "\\PC{0,60}") {
            let _ = Expression::compile(&s, &Constants::new());
        }

        #[test]
        fn token_soup_never_panics(toks in prop::collection::vec(0..TOKENS.len(), 0..25),
                                   res in json_value()) {
            let res = dom(&res);
            let src: Vec<&str> = toks.iter().map(|i| TOKENS[*i]).collect();
            let src = src.join(" ");
            if let Ok(e) = Expression::compile(&src, &Constants::new()) {
                let env = Env::new(res);
                let _ = e.evaluate(&[Item::json(res)], &env);
            }
        }

        #[test]
        fn regex_soup_never_panics(p in "[ab.*+?|()\\[\\]^$\\\\{}0-9,dws-]{0,24}",
                                   t in "[ab0-9 -]{0,30}") {
            if let Ok(re) = super::super::regex::Regex::new(&p) {
                let _ = re.is_match(&t);
                let _ = re.replace_all(&t, "x$1");
            }
            if let Ok(re) = super::super::regex::Regex::new_full(&p) {
                let _ = re.is_full_match(&t);
            }
        }

        #[test]
        fn suite_expressions_on_random_resources(res in json_value()) {
            let res = dom(&res);
            let env = Env::new(res);
            for src in [
                "name.given.join(', ')", "value.ofType(Quantity).value.lowBoundary()",
                "value.ofType(dateTime).highBoundary()", "a.getReferenceKey(Patient)",
                "value + value", "value / value", "value < value", "value = value",
                "descendants().count()", "repeat(a).value", "extension('x').value.ofType(code)",
                "a[0].a[1]", "value.toString().substring(1, 2)", "value.round(2)",
                "(value | a).distinct()", "value ~ a", "id.lowBoundary(3)",
            ] {
                let e = Expression::compile(src, &Constants::new());
                prop_assert!(e.is_ok(), "{}", src);
                if let Ok(e) = e {
                    let _ = e.evaluate(&[Item::json(res)], &env);
                }
            }
        }
    }
}
