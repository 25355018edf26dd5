//! The kick-off request: level plus parameters, encoded as a GET query string or a FHIR
//! `Parameters` body for POST (forced when `patient` is given, or with `--post`).

use serde_json::{Value, json};
use url::Url;

use super::ClientError;

/// Which population to export.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase", tag = "level", content = "group")]
pub enum ExportLevel {
    /// `[base]/$export`
    System,
    /// `[base]/Patient/$export`
    Patients,
    /// `[base]/Group/[id]/$export`
    Group(String),
}

/// A kick-off request.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExportRequest {
    /// Export level (default system).
    pub level: Option<ExportLevel>,
    /// `_type` values.
    pub types: Vec<String>,
    /// `_since` instant.
    pub since: Option<String>,
    /// `_until` instant.
    pub until: Option<String>,
    /// `_typeFilter` queries (one per parameter).
    pub type_filters: Vec<String>,
    /// `_elements`.
    pub elements: Vec<String>,
    /// `patient` references (forces POST).
    pub patients: Vec<String>,
    /// `includeAssociatedData` codes.
    pub include_associated_data: Vec<String>,
    /// `_outputFormat`.
    pub output_format: Option<String>,
    /// `organizeOutputBy`.
    pub organize_output_by: Option<String>,
    /// `allowPartialManifests=true`.
    pub allow_partial_manifests: bool,
    /// Custom `name=value` parameters.
    pub params: Vec<(String, String)>,
    /// Use POST with a Parameters body.
    pub post: bool,
    /// `Prefer: handling=lenient`.
    pub lenient: bool,
    /// STU3 `Prefer: separate-export-status`: ask for status polls that answer `200` with the
    /// job's status in `X-Export-Status` (followed whenever a server answers that way).
    #[serde(default)]
    pub separate_export_status: bool,
}

impl ExportRequest {
    /// The export level (system when unset).
    pub fn level(&self) -> ExportLevel {
        self.level.clone().unwrap_or(ExportLevel::System)
    }

    /// Whether this request is sent as POST.
    pub fn uses_post(&self) -> bool {
        self.post || !self.patients.is_empty()
    }

    /// The kick-off URL (without parameters) for a FHIR base URL.
    pub fn endpoint(&self, base: &Url) -> Result<Url, ClientError> {
        let mut base = base.clone();
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        let rel = match self.level() {
            ExportLevel::System => "$export".to_string(),
            ExportLevel::Patients => "Patient/$export".to_string(),
            ExportLevel::Group(id) => {
                if id.is_empty()
                    || !id
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
                {
                    return Err(ClientError::Invalid(format!(
                        "group id {id:?} is not a FHIR id"
                    )));
                }
                format!("Group/{id}/$export")
            }
        };
        base.join(&rel)
            .map_err(|e| ClientError::Invalid(e.to_string()))
    }

    /// Check what the IG forbids a client to send, before anything is sent: `_type` names that
    /// are not resource type names, and `_typeFilter` queries that are not one
    /// `Type?search` query (C7: a single-type context) or that use search *result* parameters
    /// (`_sort`, `_count`, `_include`, … — C7's SHALL NOT). A `_typeFilter` type missing from
    /// `_type` is allowed (servers then include that type) but logged.
    pub fn validate(&self) -> Result<(), ClientError> {
        const RESULT_PARAMS: &[&str] = &[
            "_sort",
            "_count",
            "_include",
            "_revinclude",
            "_summary",
            "_total",
            "_elements",
            "_contained",
            "_containedType",
            "_maxresults",
            "_graph",
        ];
        let is_type = |t: &str| {
            t.len() <= 64
                && t.chars().next().is_some_and(|c| c.is_ascii_uppercase())
                && t.chars().all(|c| c.is_ascii_alphanumeric())
        };
        for t in &self.types {
            if !is_type(t) {
                return Err(ClientError::Invalid(format!(
                    "_type {t:?} is not a resource type name"
                )));
            }
        }
        for f in &self.type_filters {
            let Some((ty, query)) = f.split_once('?') else {
                return Err(ClientError::Invalid(format!(
                    "_typeFilter {f:?} must be a search query like Observation?status=final"
                )));
            };
            if !is_type(ty) {
                return Err(ClientError::Invalid(format!(
                    "_typeFilter {f:?}: {ty:?} is not a resource type (one type per query)"
                )));
            }
            if query.is_empty() {
                return Err(ClientError::Invalid(format!(
                    "_typeFilter {f:?} has no search parameters"
                )));
            }
            for (name, _) in url::form_urlencoded::parse(query.as_bytes()) {
                let base = name.split(':').next().unwrap_or_default();
                if RESULT_PARAMS.contains(&base) {
                    return Err(ClientError::Invalid(format!(
                        "_typeFilter {f:?} uses the search result parameter {base}, which the \
                         Bulk Data IG does not allow in _typeFilter"
                    )));
                }
            }
            if !self.types.is_empty() && !self.types.iter().any(|t| t == ty) {
                tracing::warn!(
                    type_filter = %f,
                    "_typeFilter names a type that is not in _type; servers may export it anyway"
                );
            }
        }
        Ok(())
    }

    /// `(name, value)` pairs. `_type` and `_elements` are one comma-joined parameter each, as the
    /// IG defines them (a comma-delimited string): the IG lets a server treat repeats as joined,
    /// but HAPI FHIR binds only the first `_type` and Cerner rejects repeats, so a repeated form
    /// loses types silently. `_typeFilter` stays one parameter per query, as STU3 defines it (a
    /// query may itself hold commas), and so do the other lists.
    pub fn pairs(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        let mut push = |n: &str, v: &str| p.push((n.to_string(), v.to_string()));
        if let Some(f) = &self.output_format {
            push("_outputFormat", f);
        }
        if let Some(s) = &self.since {
            push("_since", s);
        }
        if let Some(s) = &self.until {
            push("_until", s);
        }
        if !self.types.is_empty() {
            push("_type", &self.types.join(","));
        }
        if !self.elements.is_empty() {
            push("_elements", &self.elements.join(","));
        }
        for f in &self.type_filters {
            push("_typeFilter", f);
        }
        for c in &self.include_associated_data {
            push("includeAssociatedData", c);
        }
        if let Some(o) = &self.organize_output_by {
            push("organizeOutputBy", o);
        }
        if self.allow_partial_manifests {
            push("allowPartialManifests", "true");
        }
        for (n, v) in &self.params {
            push(n, v);
        }
        p
    }

    /// The GET URL with the query string (percent-encoded, `+` as `%2B`).
    pub fn get_url(&self, base: &Url) -> Result<Url, ClientError> {
        let mut url = self.endpoint(base)?;
        let pairs = self.pairs();
        if !pairs.is_empty() {
            url.query_pairs_mut().extend_pairs(pairs);
        }
        Ok(url)
    }

    /// The POST body: a FHIR `Parameters` resource, one entry per [`pairs`](Self::pairs) pair
    /// (so `_type` and `_elements` are one comma-joined `valueString` each).
    pub fn parameters_body(&self) -> Value {
        let mut params: Vec<Value> = self
            .pairs()
            .into_iter()
            .map(|(name, value)| match name.as_str() {
                "_since" | "_until" => json!({"name": name, "valueInstant": value}),
                "allowPartialManifests" => {
                    json!({"name": name, "valueBoolean": value == "true"})
                }
                "includeAssociatedData" => json!({"name": name, "valueCode": value}),
                _ => json!({"name": name, "valueString": value}),
            })
            .collect();
        for p in &self.patients {
            let reference = if p.contains('/') {
                p.clone()
            } else {
                format!("Patient/{p}")
            };
            params.push(json!({"name": "patient", "valueReference": {"reference": reference}}));
        }
        json!({"resourceType": "Parameters", "parameter": params})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_bodies() {
        let base = Url::parse("https://ehr.example/fhir").unwrap();
        let r = ExportRequest {
            level: Some(ExportLevel::Group("g-1".into())),
            types: vec!["Patient".into(), "Observation".into()],
            since: Some("2020-01-01T00:00:00+01:00".into()),
            ..Default::default()
        };
        let u = r.get_url(&base).unwrap();
        assert_eq!(u.path(), "/fhir/Group/g-1/$export");
        assert_eq!(
            u.query(),
            Some("_since=2020-01-01T00%3A00%3A00%2B01%3A00&_type=Patient%2CObservation")
        );
        assert!(!r.uses_post());
        let r = ExportRequest {
            patients: vec!["p1".into()],
            ..r
        };
        assert!(r.uses_post());
        let body = r.parameters_body();
        assert_eq!(
            body["parameter"][0]["valueInstant"],
            "2020-01-01T00:00:00+01:00"
        );
        assert_eq!(body["parameter"][1]["name"], "_type");
        assert_eq!(body["parameter"][1]["valueString"], "Patient,Observation");
        assert_eq!(
            body["parameter"][2]["valueReference"]["reference"],
            "Patient/p1"
        );
        let bad = ExportRequest {
            level: Some(ExportLevel::Group("../x".into())),
            ..Default::default()
        };
        assert!(bad.endpoint(&base).is_err());
    }

    #[test]
    fn type_and_elements_are_joined_type_filters_repeated() {
        let r = ExportRequest {
            types: vec!["Patient".into(), "Observation".into()],
            elements: vec!["id".into(), "Observation.status".into()],
            type_filters: vec![
                "Observation?code=a,b".into(),
                "Observation?status=final".into(),
            ],
            ..Default::default()
        };
        let names = |n: &str| r.pairs().into_iter().filter(|(k, _)| k == n).count();
        assert_eq!(
            (names("_type"), names("_elements"), names("_typeFilter")),
            (1, 1, 2)
        );
        let body = r.parameters_body();
        let values: Vec<_> = body["parameter"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| format!("{}={}", p["name"].as_str().unwrap(), p["valueString"]))
            .collect();
        assert_eq!(
            values,
            [
                r#"_type="Patient,Observation""#,
                r#"_elements="id,Observation.status""#,
                r#"_typeFilter="Observation?code=a,b""#,
                r#"_typeFilter="Observation?status=final""#,
            ]
        );
    }

    #[test]
    fn type_filters_are_checked_before_sending() {
        let ok = |f: &str| {
            ExportRequest {
                type_filters: vec![f.into()],
                ..Default::default()
            }
            .validate()
        };
        assert!(ok("Observation?status=final&code=http://loinc.org|1234-5").is_ok());
        for bad in [
            "status=final",
            "Observation,Condition?status=final",
            "Observation?",
            "Observation?status=final&_count=10",
            "MedicationRequest?_include=MedicationRequest:medication",
            "Observation?_sort=date",
        ] {
            let e = ok(bad).unwrap_err().to_string();
            assert!(e.contains("_typeFilter"), "{bad}: {e}");
        }
        let bad_type = ExportRequest {
            types: vec!["../etc".into()],
            ..Default::default()
        };
        assert!(bad_type.validate().is_err());
    }
}
