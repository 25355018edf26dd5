//! RecordBatch rows as JSON objects: keys in column order, `collection` columns as arrays (a
//! view writes an empty collection as `[]`; a null list, which only SQL makes, stays `null`),
//! structs as objects, JSON text (`json` FHIR columns, the `arrow.json` extension that
//! `json_get()` answers with) as the JSON it holds, decimals as JSON numbers, temporal values in
//! FHIR lexical form. Used by `flatfhir view --format ndjson`, `query --format json`, the JSON
//! text of nested cells in CSV, and the SQL-on-FHIR conformance runner. A row is a list of
//! `(column, value)` pairs so the order survives (serde_json's map sorts keys).

use datafusion::arrow::{
    array::{
        Array, AsArray, BooleanArray, Date32Array, Decimal128Array, Float64Array, Int32Array,
        Int64Array, Time64MicrosecondArray, TimestampMicrosecondArray, UInt64Array,
    },
    datatypes::{DataType, Field, TimeUnit},
    record_batch::RecordBatch,
};
use serde_json::{Number, Value};

use crate::view::compile::FHIR_TYPE_METADATA;

/// One output row: `(column, value)` in column order.
pub type JsonRow = Vec<(String, Value)>;

/// Every row of a batch as `(column, value)` pairs in column order.
pub fn batch_to_json_rows(batch: &RecordBatch) -> Vec<JsonRow> {
    let schema = batch.schema();
    (0..batch.num_rows())
        .map(|r| {
            schema
                .fields()
                .iter()
                .zip(batch.columns())
                .map(|(f, a)| (f.name().clone(), cell_json(f, a.as_ref(), r)))
                .collect()
        })
        .collect()
}

fn number(text: &str) -> Value {
    serde_json::from_str::<Number>(text)
        .map(Value::Number)
        .unwrap_or_else(|_| Value::String(text.to_string()))
}

/// The Arrow extension type of a string holding JSON text.
const ARROW_JSON_EXTENSION: &str = "arrow.json";

/// Cell `r` of array `a` (of column `field`) as a JSON value; a null cell is `null`.
pub fn cell_json(field: &Field, a: &dyn Array, r: usize) -> Value {
    if a.is_null(r) {
        return Value::Null;
    }
    let fhir_type = field.metadata().get(FHIR_TYPE_METADATA).map(String::as_str);
    let is_json =
        fhir_type == Some("json") || field.extension_type_name() == Some(ARROW_JSON_EXTENSION);
    let text = match a.data_type() {
        DataType::Utf8 => Some(a.as_string::<i32>().value(r)),
        DataType::LargeUtf8 => Some(a.as_string::<i64>().value(r)),
        DataType::Utf8View => Some(a.as_string_view().value(r)),
        _ => None,
    };
    if let Some(s) = text {
        return match fhir_type {
            Some("decimal") => number(s),
            _ if is_json => serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.into())),
            _ => Value::String(s.to_string()),
        };
    }
    match a.data_type() {
        DataType::Boolean => Value::Bool(
            a.as_any()
                .downcast_ref::<BooleanArray>()
                .is_some_and(|x| x.value(r)),
        ),
        DataType::Int32 => a
            .as_any()
            .downcast_ref::<Int32Array>()
            .map_or(Value::Null, |x| x.value(r).into()),
        DataType::Int64 => a
            .as_any()
            .downcast_ref::<Int64Array>()
            .map_or(Value::Null, |x| x.value(r).into()),
        DataType::UInt64 => a
            .as_any()
            .downcast_ref::<UInt64Array>()
            .map_or(Value::Null, |x| x.value(r).into()),
        DataType::Float64 => a
            .as_any()
            .downcast_ref::<Float64Array>()
            .and_then(|x| Number::from_f64(x.value(r)))
            .map_or(Value::Null, Value::Number),
        DataType::Decimal128(_, s) => {
            let v = a
                .as_any()
                .downcast_ref::<Decimal128Array>()
                .map(|x| x.value(r))
                .unwrap_or_default();
            number(&decimal_text(v, *s))
        }
        DataType::Date32 => {
            let d = a
                .as_any()
                .downcast_ref::<Date32Array>()
                .map(|x| x.value(r))
                .unwrap_or_default();
            let date = chrono::NaiveDate::from_num_days_from_ce_opt(d + 719_163);
            date.map_or(Value::Null, |d| {
                Value::String(d.format("%Y-%m-%d").to_string())
            })
        }
        DataType::Timestamp(TimeUnit::Microsecond, _) => {
            let v = a
                .as_any()
                .downcast_ref::<TimestampMicrosecondArray>()
                .map(|x| x.value(r))
                .unwrap_or_default();
            chrono::DateTime::from_timestamp_micros(v).map_or(Value::Null, |t| {
                Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
            })
        }
        DataType::Time64(TimeUnit::Microsecond) => {
            let v = a
                .as_any()
                .downcast_ref::<Time64MicrosecondArray>()
                .map(|x| x.value(r))
                .unwrap_or_default();
            let (s, us) = (v / 1_000_000, v % 1_000_000);
            let mut t = format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60);
            if us != 0 {
                t.push_str(format!(".{us:06}").trim_end_matches('0'));
            }
            Value::String(t)
        }
        DataType::List(item) | DataType::LargeList(item) | DataType::FixedSizeList(item, _) => {
            let v = match a.data_type() {
                DataType::List(_) => a.as_list::<i32>().value(r),
                DataType::LargeList(_) => a.as_list::<i64>().value(r),
                _ => a.as_fixed_size_list().value(r),
            };
            Value::Array(
                (0..v.len())
                    .map(|i| cell_json(item, v.as_ref(), i))
                    .collect(),
            )
        }
        DataType::Struct(fields) => {
            let s = a.as_struct();
            Value::Object(
                fields
                    .iter()
                    .zip(s.columns())
                    .map(|(f, c)| (f.name().clone(), cell_json(f, c.as_ref(), r)))
                    .collect(),
            )
        }
        DataType::Union(fields, _) => {
            let u = a.as_union();
            let id = u.type_id(r);
            fields
                .iter()
                .find(|(i, _)| *i == id)
                .map_or(Value::Null, |(_, f)| {
                    cell_json(f, u.child(id).as_ref(), u.value_offset(r))
                })
        }
        DataType::Null => Value::Null,
        dt => {
            let fmt =
                datafusion::arrow::util::display::ArrayFormatter::try_new(a, &Default::default());
            fmt.map_or(Value::Null, |f| {
                let text = f.value(r).to_string();
                if dt.is_numeric() {
                    number(&text)
                } else {
                    Value::String(text)
                }
            })
        }
    }
}

/// Write one row as a JSON object, keys in column order.
pub fn write_json_row(out: &mut impl std::io::Write, row: &JsonRow) -> std::io::Result<()> {
    out.write_all(b"{")?;
    for (i, (k, v)) in row.iter().enumerate() {
        if i > 0 {
            out.write_all(b",")?;
        }
        serde_json::to_writer(&mut *out, k)?;
        out.write_all(b":")?;
        serde_json::to_writer(&mut *out, v)?;
    }
    out.write_all(b"}")
}

/// Unscaled i128 + scale → shortest decimal text (`150`, s=2 → `1.5`).
pub fn decimal_text(v: i128, scale: i8) -> String {
    if scale <= 0 {
        return (v * 10i128.pow((-scale) as u32)).to_string();
    }
    let neg = v < 0;
    let digits = v.unsigned_abs().to_string();
    let s = scale as usize;
    let padded = format!("{digits:0>width$}", width = s + 1);
    let (int, frac) = padded.split_at(padded.len() - s);
    let frac = frac.trim_end_matches('0');
    let mut out = String::new();
    if neg {
        out.push('-');
    }
    out.push_str(int);
    if !frac.is_empty() {
        out.push('.');
        out.push_str(frac);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_structs_and_json_text_are_json() {
        use datafusion::arrow::{
            array::{ArrayRef, Int64Array, ListArray, StringArray, StructArray, UnionArray},
            buffer::ScalarBuffer,
            datatypes::{Int64Type, UnionFields},
        };
        use std::{collections::HashMap, sync::Arc};
        let cell = |a: &ArrayRef, r| cell_json(&Field::new("c", a.data_type().clone(), true), a, r);

        let list: ArrayRef = Arc::new(ListArray::from_iter_primitive::<Int64Type, _, _>([
            Some(vec![Some(1), None]),
            Some(vec![]),
            None,
        ]));
        assert_eq!(cell(&list, 0), serde_json::json!([1, null]));
        assert_eq!(cell(&list, 1), serde_json::json!([]));
        assert_eq!(cell(&list, 2), Value::Null, "a null list is null, not []");

        let strukt: ArrayRef = Arc::new(StructArray::from(vec![(
            Arc::new(Field::new("a", DataType::Int64, true)),
            Arc::new(Int64Array::from(vec![Some(7)])) as ArrayRef,
        )]));
        assert_eq!(cell(&strukt, 0), serde_json::json!({"a": 7}));

        // json_get()'s answer: a union whose `object` member is JSON text (arrow.json).
        let json = HashMap::from([(
            "ARROW:extension:name".to_string(),
            ARROW_JSON_EXTENSION.to_string(),
        )]);
        let fields = UnionFields::try_new(
            [0, 1],
            [
                Field::new("str", DataType::Utf8, false),
                Field::new("object", DataType::Utf8, false).with_metadata(json),
            ],
        )
        .unwrap();
        let union: ArrayRef = Arc::new(
            UnionArray::try_new(
                fields,
                ScalarBuffer::from(vec![0i8, 1]),
                None,
                vec![
                    Arc::new(StringArray::from(vec!["x", ""])),
                    Arc::new(StringArray::from(vec!["", r#"{"text":"peanut"}"#])),
                ],
            )
            .unwrap(),
        );
        assert_eq!(cell(&union, 0), serde_json::json!("x"));
        assert_eq!(cell(&union, 1), serde_json::json!({"text": "peanut"}));
    }

    #[test]
    fn decimal_text_is_shortest() {
        assert_eq!(decimal_text(150, 2), "1.5");
        assert_eq!(decimal_text(-5, 2), "-0.05");
        assert_eq!(
            decimal_text(3_795_299_912_345_678_900, 18),
            "3.7952999123456789"
        );
        assert_eq!(decimal_text(12, 0), "12");
        assert_eq!(decimal_text(0, 3), "0");
    }
}
