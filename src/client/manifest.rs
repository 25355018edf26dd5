//! The completion manifest, parsed leniently across STU2, STU3 and the 4.0 ballot: `error` or
//! `outcome`, `extension` as object or array, `outputOrganizedBy: ""` as absent, unknown fields
//! ignored, `request` optional.

use serde::{Deserialize, Serialize};
use url::Url;

use super::ClientError;

/// One file of a manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestItem {
    /// Resource type of the file's lines (absent for organized output and 4.0 deleted items).
    #[serde(rename = "type", default)]
    pub type_: Option<String>,
    /// Absolute download URL.
    pub url: String,
    /// Number of resources, when the server says.
    #[serde(default)]
    pub count: Option<u64>,
}

/// A completion (or partial, or paged) manifest.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Server time the query ran; the next `_since`.
    #[serde(default)]
    pub transaction_time: String,
    /// The kick-off URL (STU2/STU3).
    #[serde(default)]
    pub request: Option<String>,
    /// Whether file downloads need the access token.
    #[serde(default)]
    pub requires_access_token: bool,
    /// Echo of `organizeOutputBy`; `""` is treated as absent.
    #[serde(default)]
    pub output_organized_by: Option<String>,
    /// Data files.
    #[serde(default)]
    pub output: Vec<ManifestItem>,
    /// Deleted-resource files (Bundles).
    #[serde(default)]
    pub deleted: Vec<ManifestItem>,
    /// OperationOutcome files (`error` before 4.0, `outcome` after).
    #[serde(default, alias = "outcome")]
    pub error: Vec<ManifestItem>,
    /// Paging links (`relation: next`).
    #[serde(default)]
    pub link: Vec<Link>,
}

/// A manifest link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Link {
    /// Must be `next`.
    pub relation: String,
    /// The next manifest page.
    pub url: String,
}

impl Manifest {
    /// Parse and validate a manifest body fetched from `from`. Every file URL must be absolute
    /// http(s) (relative ones are resolved against `from`).
    pub fn parse(body: &[u8], from: &Url) -> Result<Manifest, ClientError> {
        let proto = |message: String| ClientError::Protocol {
            url: super::error::redact(from),
            message,
        };
        let v: serde_json::Value = serde_json::from_slice(body)
            .map_err(|e| proto(format!("manifest is not JSON: {e}")))?;
        if v.get("resourceType").and_then(|r| r.as_str()) == Some("OperationOutcome") {
            let oo: super::OperationOutcome = serde_json::from_value(v).unwrap_or_default();
            return Err(ClientError::JobFailed(oo.summary()));
        }
        let mut m: Manifest = serde_json::from_value(v)
            .map_err(|e| proto(format!("not a Bulk Data manifest: {e}")))?;
        if m.output_organized_by.as_deref() == Some("") {
            m.output_organized_by = None;
        }
        for (kind, items) in [
            ("output", &mut m.output),
            ("deleted", &mut m.deleted),
            ("error", &mut m.error),
        ] {
            for (index, item) in items.iter_mut().enumerate() {
                item.url = check_url(&item.url, from)
                    .map_err(|e| {
                        let type_ = item
                            .type_
                            .as_deref()
                            .map(|t| format!(" (type {})", super::error::redact_raw(t)))
                            .unwrap_or_default();
                        proto(format!("manifest entry {kind}[{index}]{type_}: {e}"))
                    })?
                    .to_string();
            }
        }
        for (index, l) in m.link.iter_mut().enumerate() {
            l.url = check_url(&l.url, from)
                .map_err(|e| proto(format!("manifest link[{index}] ({}): {e}", l.relation)))?
                .to_string();
        }
        Ok(m)
    }

    /// The `next` page, if any.
    pub fn next_page(&self) -> Option<&str> {
        self.link
            .iter()
            .find(|l| l.relation == "next")
            .map(|l| l.url.as_str())
    }
}

/// Resolve `raw` (a manifest URL, a `Content-Location`) against `base` and check it: http or
/// https only, and never plain http when `base` is https (the token and the data would travel
/// unencrypted). The error names the URL, redacted (see [`redact`](super::error_redact)).
pub fn check_url(raw: &str, base: &Url) -> Result<Url, String> {
    let u = base.join(raw).map_err(|e| {
        format!(
            "refusing URL {}: it does not parse ({e})",
            super::error::redact_raw(raw)
        )
    })?;
    let shown = || super::error_redact(&u);
    match u.scheme() {
        "https" => Ok(u),
        "http" if base.scheme() == "https" => Err(format!(
            "refusing URL {}: plain http where the server is https",
            shown()
        )),
        "http" => Ok(u),
        s => Err(format!(
            "refusing URL {}: scheme {s:?} (only http and https)",
            shown()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_manifest_shapes() {
        let from = Url::parse("https://ehr.example/fhir/status/1").unwrap();
        let stu2 = br#"{"transactionTime":"2020-01-01T00:00:00Z","request":"x","requiresAccessToken":true,
            "output":[{"type":"Patient","url":"https://ehr.example/f/1.ndjson","count":3}],"error":[],
            "extension":{"x":1},"outputOrganizedBy":""}"#;
        let m = Manifest::parse(stu2, &from).unwrap();
        assert!(m.requires_access_token && m.output_organized_by.is_none());
        assert_eq!(m.output[0].count, Some(3));
        let v4 = br#"{"transactionTime":"2020-01-01T00:00:00Z","requiresAccessToken":false,
            "output":[{"type":"Patient","url":"f/2.ndjson"}],"outcome":[{"url":"f/oo.ndjson"}],
            "deleted":[{"url":"f/d.ndjson"}],"extension":[{"url":"x","valueString":"y"}],
            "link":[{"relation":"next","url":"?page=2"}]}"#;
        let m = Manifest::parse(v4, &from).unwrap();
        assert_eq!(
            m.output[0].url,
            "https://ehr.example/fhir/status/f/2.ndjson"
        );
        assert_eq!(m.error.len(), 1);
        assert_eq!(
            m.next_page(),
            Some("https://ehr.example/fhir/status/1?page=2")
        );
        let bad =
            br#"{"transactionTime":"t","output":[{"type":"Patient","url":"file:///etc/passwd"}]}"#;
        assert!(
            Manifest::parse(bad, &from)
                .unwrap_err()
                .to_string()
                .contains("scheme")
        );
        let oo = br#"{"resourceType":"OperationOutcome","issue":[{"severity":"fatal","code":"processing","diagnostics":"boom"}]}"#;
        assert!(
            Manifest::parse(oo, &from)
                .unwrap_err()
                .to_string()
                .contains("boom")
        );
    }

    #[test]
    fn refused_urls_name_the_entry_and_the_url() {
        let https = Url::parse("https://ehr.example/fhir/$export-status/1?job=secret").unwrap();
        let refused = |items: &str, from: &Url| {
            let body = format!(r#"{{"transactionTime":"t",{items}}}"#);
            Manifest::parse(body.as_bytes(), from)
                .unwrap_err()
                .to_string()
        };
        let ok = r#"{"type":"Patient","url":"https://ehr.example/f/0.ndjson"}"#;
        // A file: URL, third in `output`.
        let e = refused(
            &format!(r#""output":[{ok},{ok},{{"type":"Observation","url":"file:///etc/passwd"}}]"#),
            &https,
        );
        assert!(e.contains("output[2] (type Observation)"), "{e}");
        assert!(
            e.contains("file:///etc/passwd") && e.contains("\"file\""),
            "{e}"
        );
        // The status URL the manifest came from is redacted, readably.
        assert!(
            e.contains("https://ehr.example/fhir/$export-status/1?…"),
            "{e}"
        );
        assert!(!e.contains("secret"), "{e}");
        // Plain http from an https server, in `deleted`; the signed query is not shown.
        let e = refused(
            r#""output":[],"deleted":[{"url":"http://cdn.example/d/0.ndjson?sig=s3cr3t"}]"#,
            &https,
        );
        assert!(e.contains("deleted[0]:") && e.contains("plain http"), "{e}");
        assert!(e.contains("http://cdn.example/d/0.ndjson?…"), "{e}");
        assert!(!e.contains("s3cr3t"), "{e}");
        // A URL that does not parse, in `error`.
        let e = refused(
            r#""output":[],"error":[{"type":"OperationOutcome","url":"https://bad host/e.ndjson?sig=s3cr3t"}]"#,
            &https,
        );
        assert!(
            e.contains("error[0] (type OperationOutcome)") && e.contains("does not parse"),
            "{e}"
        );
        assert!(
            e.contains("https://bad host/e.ndjson?…") && !e.contains("s3cr3t"),
            "{e}"
        );
        // http from an http server is fine.
        let http = Url::parse("http://127.0.0.1:8080/fhir/$export-status/1").unwrap();
        let m = Manifest::parse(
            br#"{"transactionTime":"t","output":[{"type":"Patient","url":"http://127.0.0.1:9/f"}]}"#,
            &http,
        )
        .unwrap();
        assert_eq!(m.output[0].url, "http://127.0.0.1:9/f");
    }
}
