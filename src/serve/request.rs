//! Kick-off parameters → a validated [`ExportRequest`], before any job exists.
//!
//! All checks that can fail a kick-off happen here, against the loaded data (unknown group or
//! patient, `_typeFilter` on an element the type never has), so that an accepted job cannot fail
//! later except by an injected fault. Strict by default: anything unsupported is a `400`; with
//! `Prefer: handling=lenient` it is ignored and reported as an OperationOutcome line in the
//! manifest's `error` file.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime};

use super::data::{Dataset, patient_id_of};
use super::faults::RequestFaults;
use super::outcome::{Issue, Rejection};

/// The kick-off endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Level {
    /// `[base]/$export`
    System,
    /// `[base]/Patient/$export`
    Patient,
    /// `[base]/Group/{id}/$export`
    Group(String),
}

/// `_elements` entry: an element name, for one type or (`None`) for every type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ElementSpec {
    pub resource_type: Option<String>,
    pub element: String,
}

/// One `_typeFilter` query: every criterion must match (AND); a criterion matches when the
/// element equals any of its values (OR).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TypeFilter {
    pub criteria: Vec<(String, Vec<String>)>,
}

/// A validated kick-off.
#[derive(Debug, Clone, Default)]
pub(super) struct ExportRequest {
    /// Requested types (`_type`); `None` = all.
    pub types: Option<BTreeSet<String>>,
    /// Exclusive lower bound on `meta.lastUpdated`.
    pub since: Option<DateTime<FixedOffset>>,
    /// Exclusive upper bound on `meta.lastUpdated`.
    pub until: Option<DateTime<FixedOffset>>,
    pub elements: Vec<ElementSpec>,
    /// Patients whose compartments are exported; `None` = no restriction (system level, or
    /// Patient level without `patient`).
    pub population: Option<HashSet<String>>,
    /// Filters per type; queries for the same type are OR-ed.
    pub type_filters: BTreeMap<String, Vec<TypeFilter>>,
    /// OperationOutcome issues for the manifest's `error` file.
    pub notes: Vec<Issue>,
    /// `allowPartialManifests=true`: `202` polls may carry a manifest of the files ready so far.
    pub allow_partial: bool,
    pub faults: RequestFaults,
}

const OUTPUT_FORMATS: [&str; 3] = ["application/fhir+ndjson", "application/ndjson", "ndjson"];

impl ExportRequest {
    /// Validate kick-off parameters (`name`, `value` pairs; comma lists not yet split).
    /// `first_value_only` is the server-wide `first-value-only` fault ([`Faults`]), which a
    /// request may also ask for.
    ///
    /// [`Faults`]: super::Faults
    pub fn parse(
        level: &Level,
        params: &[(String, String)],
        post: bool,
        lenient: bool,
        first_value_only: bool,
        data: &Dataset,
    ) -> Result<Self, Rejection> {
        let mut req = ExportRequest {
            faults: RequestFaults::parse(
                params
                    .iter()
                    .filter(|(n, _)| n == "_flatfhirFault")
                    .map(|(_, v)| v.as_str()),
            )
            .map_err(Rejection::invalid)?,
            ..Default::default()
        };
        let first_value_only = first_value_only || req.faults.faults.first_value_only;
        let unsupported = |notes: &mut Vec<Issue>, what: String| {
            if lenient {
                notes.push(Issue {
                    severity: "warning",
                    code: "not-supported",
                    diagnostics: format!("{what}; ignored (Prefer: handling=lenient)"),
                });
                Ok(())
            } else {
                Err(Rejection::not_supported(what))
            }
        };
        let values = |name: &'static str| {
            params
                .iter()
                .filter(move |(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        };
        let single = |name: &'static str| -> Result<Option<&str>, Rejection> {
            let mut it = values(name);
            let first = it.next();
            if it.next().is_some() {
                return Err(Rejection::invalid(format!("{name} may be given only once")));
            }
            Ok(first)
        };
        let list = |name: &'static str| -> Vec<&str> {
            // HAPI binds `_type` and `_elements` as one string: a repeat is dropped.
            let keep = if first_value_only && matches!(name, "_type" | "_elements") {
                1
            } else {
                usize::MAX
            };
            values(name)
                .take(keep)
                .flat_map(|v| v.split(','))
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .collect()
        };

        let mut unknown = BTreeSet::new();
        for (name, _) in params {
            let known = matches!(
                name.as_str(),
                "_outputFormat"
                    | "_since"
                    | "_until"
                    | "_type"
                    | "_elements"
                    | "patient"
                    | "_typeFilter"
                    | "includeAssociatedData"
                    | "organizeOutputBy"
                    | "allowPartialManifests"
                    | "_flatfhirFault"
            );
            if !known {
                unknown.insert(name);
            }
        }
        for name in unknown {
            unsupported(&mut req.notes, format!("unknown parameter {name}"))?;
        }

        if let Some(format) = single("_outputFormat")?
            && !OUTPUT_FORMATS.contains(&format)
        {
            return Err(Rejection::invalid(format!(
                "_outputFormat {format:?} is not supported; use one of {OUTPUT_FORMATS:?}"
            )));
        }
        for (name, slot) in [("_since", &mut req.since), ("_until", &mut req.until)] {
            if let Some(v) = single(name)? {
                *slot = Some(parse_instant(v).ok_or_else(|| {
                    Rejection::invalid(format!("{name} {v:?} is not a FHIR instant"))
                })?);
            }
        }

        let types = list("_type");
        if let Some(bad) = types.iter().find(|t| !is_type_name(t)) {
            return Err(Rejection::invalid(format!(
                "_type {bad:?} is not a resource type"
            )));
        }
        // A type that neither FHIR R4 nor the served data has (a typo: `Observaton`) is
        // refused, or under lenient handling ignored with a note — never silently exported
        // as nothing (IG: a server SHOULD answer 4XX for a type it does not support).
        let known = data.counts();
        let mut kept = Vec::new();
        for &t in &types {
            if crate::view::is_r4_resource_type(t) || known.contains_key(t) {
                kept.push(t);
            } else {
                unsupported(
                    &mut req.notes,
                    format!("_type {t:?} is not a resource type this server has"),
                )?;
            }
        }
        if !types.is_empty() && kept.is_empty() {
            return Err(Rejection::invalid(
                "none of the _type values is a resource type this server has".to_string(),
            ));
        }
        if !kept.is_empty() {
            req.types = Some(kept.iter().map(|t| t.to_string()).collect());
        }

        for spec in list("_elements") {
            let (resource_type, element) = match spec.split_once('.') {
                Some((t, e)) => (Some(t), e),
                None => (None, spec),
            };
            if resource_type.is_some_and(|t| !is_type_name(t)) || !is_element_name(element) {
                return Err(Rejection::invalid(format!(
                    "_elements {spec:?} is not an element or Type.element"
                )));
            }
            req.elements.push(ElementSpec {
                resource_type: resource_type.map(str::to_string),
                element: element.to_string(),
            });
        }

        for query in values("_typeFilter").flat_map(split_type_filters) {
            match parse_type_filter(query, data) {
                Ok((t, filter)) => req.type_filters.entry(t).or_default().push(filter),
                Err(why) => unsupported(&mut req.notes, format!("_typeFilter {query:?}: {why}"))?,
            }
        }

        if values("includeAssociatedData").next().is_some() {
            req.notes.push(Issue::info(
                "includeAssociatedData is not supported by this server and was ignored",
            ));
        }
        if let Some(by) = single("organizeOutputBy")? {
            unsupported(
                &mut req.notes,
                format!("organizeOutputBy={by} is not supported"),
            )?;
        }
        match single("allowPartialManifests")? {
            Some("true") => req.allow_partial = true,
            Some("false") | None => {}
            Some(v) => {
                return Err(Rejection::invalid(format!(
                    "allowPartialManifests {v:?} is not a boolean"
                )));
            }
        }
        let mut patients = Vec::new();
        let patient_values = list("patient");
        if !patient_values.is_empty() {
            if *level == Level::System {
                unsupported(
                    &mut req.notes,
                    "patient is not allowed at system level".to_string(),
                )?;
            } else if !post {
                unsupported(
                    &mut req.notes,
                    "patient is only supported in a POST Parameters body".to_string(),
                )?;
            } else {
                for v in patient_values {
                    let id = patient_id_of(v).unwrap_or(v);
                    if !data.patient_ids.contains(id) {
                        return Err(Rejection::invalid(format!("unknown patient {v:?}")));
                    }
                    patients.push(id.to_string());
                }
            }
        }

        req.population = match level {
            Level::System => None,
            Level::Patient if patients.is_empty() => None,
            Level::Patient => Some(patients.into_iter().collect()),
            Level::Group(id) => {
                let members = data
                    .groups
                    .get(id)
                    .ok_or_else(|| Rejection::not_found(format!("unknown Group {id:?}")))?;
                if let Some(p) = patients.iter().find(|p| !members.contains(p)) {
                    return Err(Rejection::invalid(format!(
                        "patient {p:?} is not a member of Group {id:?}"
                    )));
                }
                Some(if patients.is_empty() {
                    members.iter().cloned().collect()
                } else {
                    patients.into_iter().collect()
                })
            }
        };
        Ok(req)
    }
}

/// FHIR instant, leniently: RFC 3339, a zone-less date-time (UTC) or a date (UTC midnight).
/// A space stands for `+`, which an unencoded query string turns into one.
pub(super) fn parse_instant(s: &str) -> Option<DateTime<FixedOffset>> {
    let s = s.trim().replace(' ', "+");
    if let Ok(t) = DateTime::parse_from_rfc3339(&s) {
        return Some(t);
    }
    let utc = FixedOffset::east_opt(0)?;
    if let Ok(t) = NaiveDateTime::parse_from_str(&s, "%Y-%m-%dT%H:%M:%S%.f") {
        return t.and_local_timezone(utc).single();
    }
    let d = NaiveDate::parse_from_str(&s, "%Y-%m-%d").ok()?;
    d.and_hms_opt(0, 0, 0)?.and_local_timezone(utc).single()
}

fn is_type_name(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_uppercase()) && s.chars().all(|c| c.is_ascii_alphanumeric())
}

fn is_element_name(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_alphabetic()) && s.chars().all(|c| c.is_ascii_alphanumeric())
}

/// Split a `_typeFilter` value into queries: STU2 comma-joins queries, STU3 repeats the
/// parameter, and a comma inside a query is an OR of values. So split only at commas that start
/// a new `Type?` query.
fn split_type_filters(value: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, _) in value.match_indices(',') {
        let next = &value[i + 1..];
        let starts_query = next
            .split_once('?')
            .is_some_and(|(t, _)| is_type_name(t.trim()));
        if starts_query {
            out.push(value[start..i].trim());
            start = i + 1;
        }
    }
    out.push(value[start..].trim());
    out.retain(|q| !q.is_empty());
    out
}

/// `Type?element=value[&element=value]`, with elements the type actually has.
fn parse_type_filter(query: &str, data: &Dataset) -> Result<(String, TypeFilter), String> {
    let (resource_type, search) = query.split_once('?').ok_or("expected Type?element=value")?;
    if !is_type_name(resource_type) {
        return Err(format!("{resource_type:?} is not a resource type"));
    }
    let mut criteria = Vec::new();
    for (name, value) in url::form_urlencoded::parse(search.as_bytes()) {
        if !is_element_name(&name) {
            return Err(format!(
                "search parameter {name:?} is not supported (only plain element names, no \
                 modifiers, chains or _parameters)"
            ));
        }
        let known = data.elements.get(resource_type);
        if known.is_some_and(|k| !k.contains(name.as_ref())) {
            return Err(format!(
                "{name:?} is not an element of {resource_type} (other search parameters are not \
                 supported)"
            ));
        }
        let values: Vec<String> = value.split(',').map(str::to_string).collect();
        if values.iter().any(String::is_empty) {
            return Err(format!("empty value for {name:?}"));
        }
        criteria.push((name.into_owned(), values));
    }
    if criteria.is_empty() {
        return Err("no search criteria".into());
    }
    Ok((resource_type.to_string(), TypeFilter { criteria }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::DataSource;

    fn data() -> Dataset {
        let text = concat!(
            r#"{"resourceType":"Patient","id":"p1","gender":"female"}"#,
            "\n",
            r#"{"resourceType":"Patient","id":"p2"}"#,
            "\n",
            r#"{"resourceType":"Observation","id":"o","status":"final","code":{"coding":[]}}"#,
            "\n",
            r#"{"resourceType":"Group","id":"g","member":[{"entity":{"reference":"Patient/p1"}}]}"#,
        );
        Dataset::load(DataSource::Files(vec![(
            "x".into(),
            bytes::Bytes::from_static(text.as_bytes()),
        )]))
        .unwrap()
    }

    fn parse(
        level: Level,
        pairs: &[(&str, &str)],
        post: bool,
        lenient: bool,
    ) -> Result<ExportRequest, Rejection> {
        let params: Vec<(String, String)> = pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        ExportRequest::parse(&level, &params, post, lenient, false, &data())
    }

    #[test]
    fn types_elements_and_instants() {
        let r = parse(
            Level::System,
            &[
                ("_type", "Patient, Observation"),
                ("_type", "Condition"),
                ("_elements", "gender,Observation.status"),
                ("_since", "2020-01-01T00:00:00 01:00"),
                ("_outputFormat", "ndjson"),
            ],
            false,
            false,
        )
        .unwrap();
        assert_eq!(r.types.unwrap().len(), 3);
        assert_eq!(r.elements[1].resource_type.as_deref(), Some("Observation"));
        // The `first-value-only` fault binds `_type` as HAPI does: the first parameter only.
        let hapi = parse(
            Level::System,
            &[
                ("_flatfhirFault", "first-value-only"),
                ("_type", "Patient,Observation"),
                ("_type", "Condition"),
            ],
            false,
            false,
        )
        .unwrap();
        assert_eq!(
            hapi.types.unwrap().into_iter().collect::<Vec<_>>(),
            ["Observation", "Patient"]
        );
        assert_eq!(r.since.unwrap().to_rfc3339(), "2020-01-01T00:00:00+01:00");
        assert!(parse(Level::System, &[("_outputFormat", "text/csv")], false, true).is_err());
        assert!(parse(Level::System, &[("_since", "yesterday")], false, true).is_err());
        assert_eq!(
            parse_instant("2021-02-03").unwrap().to_rfc3339(),
            "2021-02-03T00:00:00+00:00"
        );
    }

    /// A type neither R4 nor the data has: refused, or under lenient handling left out with
    /// a note; never exported silently as nothing.
    #[test]
    fn unknown_types_are_refused_or_noted() {
        let strict = |t: &str| parse(Level::System, &[("_type", t)], false, false);
        assert!(strict("Foo").is_err());
        assert!(strict("Patient,Observaton").is_err());
        let lenient = parse(
            Level::System,
            &[("_type", "Patient,Observaton")],
            false,
            true,
        )
        .unwrap();
        assert_eq!(
            lenient.types,
            Some(std::iter::once("Patient".to_string()).collect())
        );
        assert_eq!(lenient.notes.len(), 1);
        assert!(lenient.notes[0].diagnostics.contains("Observaton"));
        assert!(parse(Level::System, &[("_type", "Foo")], false, true).is_err());
        // R4 types the data does not hold are fine (an empty export of them).
        assert!(strict("Medication").is_ok());
    }

    #[test]
    fn strict_rejects_what_lenient_notes() {
        let strict = parse(Level::System, &[("foo", "1")], false, false).unwrap_err();
        assert_eq!(strict.status, 400);
        assert_eq!(strict.issue.code, "not-supported");
        let lenient = parse(
            Level::System,
            &[
                ("foo", "1"),
                ("organizeOutputBy", "Patient"),
                ("includeAssociatedData", "x"),
            ],
            false,
            true,
        )
        .unwrap();
        assert_eq!(lenient.notes.len(), 3);
        assert!(
            parse(
                Level::System,
                &[("organizeOutputBy", "Patient")],
                false,
                false
            )
            .is_err()
        );
    }

    #[test]
    fn patient_and_group_populations() {
        let r = parse(Level::Group("g".into()), &[], false, false).unwrap();
        assert_eq!(
            r.population.unwrap().into_iter().collect::<Vec<_>>(),
            ["p1"]
        );
        let r = parse(Level::Patient, &[("patient", "Patient/p2")], true, false).unwrap();
        assert!(r.population.unwrap().contains("p2"));
        assert_eq!(
            parse(
                Level::Patient,
                &[("patient", "Patient/nobody")],
                true,
                false
            )
            .unwrap_err()
            .status,
            400
        );
        let not_member = parse(Level::Group("g".into()), &[("patient", "p2")], true, false);
        assert_eq!(not_member.unwrap_err().status, 400);
        assert_eq!(
            parse(Level::Group("none".into()), &[], false, false)
                .unwrap_err()
                .status,
            404
        );
        // GET cannot carry `patient`.
        assert!(parse(Level::Patient, &[("patient", "p1")], false, false).is_err());
    }

    #[test]
    fn type_filters_split_and_validate() {
        assert_eq!(
            split_type_filters("Observation?code=a,b,Patient?gender=female"),
            ["Observation?code=a,b", "Patient?gender=female"]
        );
        let r = parse(
            Level::System,
            &[(
                "_typeFilter",
                "Observation?status=final&code=http://loinc.org%7C1,2",
            )],
            false,
            false,
        )
        .unwrap();
        let f = &r.type_filters["Observation"][0];
        assert_eq!(f.criteria[1].1, ["http://loinc.org|1", "2"]);
        for bad in [
            "Observation?date=gt2020",
            "Observation?code:text=x",
            "Observation",
            "?x=1",
        ] {
            let strict = parse(Level::System, &[("_typeFilter", bad)], false, false);
            assert!(strict.is_err(), "{bad}");
            let lenient = parse(Level::System, &[("_typeFilter", bad)], false, true).unwrap();
            assert!(
                lenient.type_filters.is_empty() && lenient.notes.len() == 1,
                "{bad}"
            );
        }
    }
}
