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
        for item in m
            .output
            .iter_mut()
            .chain(m.deleted.iter_mut())
            .chain(m.error.iter_mut())
        {
            item.url = check_url(&item.url, from).map_err(&proto)?.to_string();
        }
        for l in m.link.iter_mut() {
            l.url = check_url(&l.url, from).map_err(&proto)?.to_string();
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

/// Resolve `raw` against `base` and require http or https.
pub fn check_url(raw: &str, base: &Url) -> Result<Url, String> {
    let u = base
        .join(raw)
        .map_err(|e| format!("bad URL {raw:?}: {e}"))?;
    match u.scheme() {
        "http" | "https" => Ok(u),
        s => Err(format!(
            "refusing URL with scheme {s:?} (only http and https)"
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
}
