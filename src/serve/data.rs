//! The served data: ndjson lines loaded once, indexed by type, patient compartment and group.
//!
//! Resources are kept as the raw line bytes (slices of the loaded file, no copies) plus the few
//! fields an export needs to select them: type, id, `meta.lastUpdated`, the patients the line
//! references and its top-level element names. Lines are never re-serialised unless `_elements`
//! or `_typeFilter` needs to look inside them, so an export returns the bytes it was given.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::io::Read;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, FixedOffset};
use serde::Deserialize;
use serde::de::{IgnoredAny, MapAccess, Visitor};

use super::{DataSource, ServeError};

/// One loaded resource.
#[derive(Debug)]
pub(super) struct Resource {
    pub id: Option<String>,
    pub last_updated: Option<DateTime<FixedOffset>>,
    /// Ids of the patients whose compartment holds this resource (a Patient is in its own).
    pub patients: Box<[Box<str>]>,
    /// The line, without its newline.
    pub raw: Bytes,
}

/// Everything the server serves, read-only after loading.
#[derive(Debug, Default)]
pub(super) struct Dataset {
    pub resources: Vec<Resource>,
    /// Indices into `resources` per type, in load order; types sorted by name.
    pub by_type: BTreeMap<Arc<str>, Vec<usize>>,
    /// Ids of the Patient resources.
    pub patient_ids: HashSet<String>,
    /// Group id → member patient ids (`member[].entity.reference`).
    pub groups: HashMap<String, Vec<String>>,
    /// Top-level element names seen per type (to tell `_typeFilter` elements from search params).
    pub elements: HashMap<Arc<str>, BTreeSet<String>>,
}

impl Dataset {
    /// Read and index a data source. Blocking: call it from `spawn_blocking`.
    pub fn load(source: DataSource) -> Result<Self, ServeError> {
        let mut dataset = Self::default();
        match source {
            DataSource::Dir(dir) => {
                let err = |path: &std::path::Path, source| ServeError::Data {
                    path: path.display().to_string(),
                    source,
                };
                let mut paths = Vec::new();
                for entry in std::fs::read_dir(&dir).map_err(|e| err(&dir, e))? {
                    let path = entry.map_err(|e| err(&dir, e))?.path();
                    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    if path.is_file() && (name.ends_with(".ndjson") || name.ends_with(".ndjson.gz"))
                    {
                        paths.push(path);
                    }
                }
                paths.sort();
                for path in paths {
                    let content = std::fs::read(&path).map_err(|e| err(&path, e))?;
                    dataset.add_file(&path.display().to_string(), Bytes::from(content))?;
                }
            }
            DataSource::Files(files) => {
                for (name, content) in files {
                    dataset.add_file(&name, content)?;
                }
            }
        }
        tracing::info!(
            resources = dataset.resources.len(),
            types = dataset.by_type.len(),
            groups = dataset.groups.len(),
            "Loaded the data to serve."
        );
        Ok(dataset)
    }

    /// Resources per type.
    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.by_type
            .iter()
            .map(|(t, idx)| (t.to_string(), idx.len() as u64))
            .collect()
    }

    fn add_file(&mut self, name: &str, content: Bytes) -> Result<(), ServeError> {
        let content = if content.starts_with(&[0x1f, 0x8b]) {
            let mut out = Vec::with_capacity(content.len() * 8);
            flate2::read::MultiGzDecoder::new(&content[..])
                .read_to_end(&mut out)
                .map_err(|source| ServeError::Data {
                    path: name.to_string(),
                    source,
                })?;
            Bytes::from(out)
        } else {
            content
        };
        let mut skipped = 0usize;
        let mut start = 0;
        let mut line_no = 0;
        while start < content.len() {
            let end = memchr::memchr(b'\n', &content[start..]).map_or(content.len(), |i| start + i);
            line_no += 1;
            let mut line = &content[start..end];
            while let Some((last, rest)) = line.split_last()
                && last.is_ascii_whitespace()
            {
                line = rest;
            }
            if !line.is_empty() {
                let raw = content.slice_ref(line);
                if !self.add_line(raw) {
                    skipped += 1;
                    tracing::warn!(
                        file = name,
                        line = line_no,
                        "Skipped a line without resourceType."
                    );
                }
            }
            start = end + 1;
        }
        if skipped > 0 {
            tracing::warn!(
                file = name,
                skipped,
                "Some lines had no resourceType and are not served."
            );
        }
        Ok(())
    }

    /// Index one line; false when it has no `resourceType`.
    fn add_line(&mut self, raw: Bytes) -> bool {
        let Ok(head) = serde_json::from_slice::<Head>(&raw) else {
            return false;
        };
        let Some(rt) = head.resource_type.filter(|t| !t.is_empty()) else {
            return false;
        };
        let resource_type = match self.by_type.get_key_value(rt.as_ref()) {
            Some((k, _)) => k.clone(),
            None => Arc::from(rt.as_ref()),
        };
        let known = self.elements.entry(resource_type.clone()).or_default();
        for key in head.keys {
            if !known.contains(key.as_ref()) {
                known.insert(key.into_owned());
            }
        }
        let mut patients: Vec<Box<str>> = Vec::new();
        if &*resource_type == "Patient"
            && let Some(id) = &head.id
        {
            self.patient_ids.insert(id.to_string());
            patients.push(id.as_ref().into());
        }
        for id in patient_references(&raw) {
            if !patients.iter().any(|p| p.as_ref() == id) {
                patients.push(id.into());
            }
        }
        if &*resource_type == "Group"
            && let Some(id) = &head.id
        {
            self.groups.insert(id.to_string(), group_members(&raw));
        }
        let last_updated = head
            .last_updated
            .and_then(|s| DateTime::parse_from_rfc3339(&s).ok());
        let index = self.resources.len();
        self.resources.push(Resource {
            id: head.id.map(Cow::into_owned),
            last_updated,
            patients: patients.into_boxed_slice(),
            raw,
        });
        self.by_type.entry(resource_type).or_default().push(index);
        true
    }
}

/// The id of the patient a reference points at: `Patient/1`, `http://x/fhir/Patient/1`,
/// `Patient/1/_history/2`. Searches (`Patient?identifier=…`) and other types give `None`.
pub(super) fn patient_id_of(reference: &str) -> Option<&str> {
    let rest = match reference.strip_prefix("Patient/") {
        Some(rest) => rest,
        None => {
            let at = reference.find("/Patient/")?;
            &reference[at + "/Patient/".len()..]
        }
    };
    let id = rest.split('/').next().unwrap_or("");
    (!id.is_empty() && !id.contains(['?', '#', '"'])).then_some(id)
}

/// Patient ids referenced anywhere in a line (`"reference": "…Patient/<id>"`), found with memchr
/// rather than a JSON parse: loading synthea-100 parses ~38k lines once, but scans them fast.
fn patient_references(raw: &[u8]) -> impl Iterator<Item = &str> {
    const KEY: &[u8] = b"\"reference\"";
    memchr::memmem::find_iter(raw, KEY).filter_map(move |at| {
        let rest = skip_ws(&raw[at + KEY.len()..]);
        let rest = skip_ws(rest.strip_prefix(b":")?);
        let rest = rest.strip_prefix(b"\"")?;
        let end = memchr::memchr(b'"', rest)?;
        patient_id_of(std::str::from_utf8(&rest[..end]).ok()?)
    })
}

fn skip_ws(mut s: &[u8]) -> &[u8] {
    while let Some((first, rest)) = s.split_first()
        && first.is_ascii_whitespace()
    {
        s = rest;
    }
    s
}

/// Member patient ids of a Group line.
fn group_members(raw: &[u8]) -> Vec<String> {
    let Ok(group) = serde_json::from_slice::<serde_json::Value>(raw) else {
        return Vec::new();
    };
    let members = group.get("member").and_then(|m| m.as_array());
    members
        .into_iter()
        .flatten()
        .filter_map(|m| m.pointer("/entity/reference")?.as_str())
        .filter_map(patient_id_of)
        .map(str::to_string)
        .collect()
}

/// The fields of a line the index needs, read without building a DOM.
struct Head<'a> {
    resource_type: Option<Cow<'a, str>>,
    id: Option<Cow<'a, str>>,
    last_updated: Option<Cow<'a, str>>,
    keys: Vec<Cow<'a, str>>,
}

/// A string borrowed from the input when it has no escapes.
struct Str<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Str<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Str<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

/// `meta`, of which only `lastUpdated` matters.
struct MetaHead<'a>(Option<Cow<'a, str>>);

impl<'de> Deserialize<'de> for MetaHead<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MetaHead<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a meta object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut last_updated = None;
                while let Some(key) = map.next_key::<Str>()? {
                    if key.0 == "lastUpdated" {
                        last_updated = map.next_value::<Option<Str>>()?.map(|s| s.0);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(MetaHead(last_updated))
            }
        }
        d.deserialize_map(V)
    }
}

impl<'de> Deserialize<'de> for Head<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Head<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a FHIR resource object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut head = Head {
                    resource_type: None,
                    id: None,
                    last_updated: None,
                    keys: Vec::new(),
                };
                while let Some(key) = map.next_key::<Str>()? {
                    match key.0.as_ref() {
                        "resourceType" => head.resource_type = Some(map.next_value::<Str>()?.0),
                        "id" => head.id = map.next_value::<Option<Str>>()?.map(|s| s.0),
                        "meta" => {
                            head.last_updated =
                                map.next_value::<Option<MetaHead>>()?.and_then(|m| m.0)
                        }
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                    head.keys.push(key.0);
                }
                Ok(head)
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &'static str) -> Dataset {
        Dataset::load(DataSource::Files(vec![(
            "t.ndjson".into(),
            Bytes::from_static(text.as_bytes()),
        )]))
        .unwrap()
    }

    #[test]
    fn indexes_types_patients_groups_and_skips_lines_without_type() {
        let d = load(concat!(
            r#"{"resourceType":"Patient","id":"p1","meta":{"lastUpdated":"2020-01-01T00:00:00Z"}}"#,
            "\n",
            r#"{"resourceType":"Observation","id":"o1","subject": { "reference" : "http://x/fhir/Patient/p2/_history/1"}}"#,
            "\r\n\n",
            r#"{"id":"no-type"}"#,
            "\n",
            "not json\n",
            r#"{"resourceType":"Group","id":"g","member":[{"entity":{"reference":"Patient/p1"}}]}"#,
            r#"  "#,
        ));
        assert_eq!(
            d.counts().into_iter().collect::<Vec<_>>(),
            [
                ("Group".into(), 1),
                ("Observation".into(), 1),
                ("Patient".into(), 1)
            ]
        );
        assert_eq!(&*d.resources[0].patients, [Box::from("p1")]);
        assert_eq!(&*d.resources[1].patients, [Box::from("p2")]);
        assert_eq!(d.groups["g"], ["p1"]);
        assert!(d.resources[0].last_updated.is_some());
        assert!(d.elements["Observation"].contains("subject"));
        assert_eq!(&d.resources[1].raw[..], &br#"{"resourceType":"Observation","id":"o1","subject": { "reference" : "http://x/fhir/Patient/p2/_history/1"}}"#[..]);
    }

    #[test]
    fn gzip_detected_by_magic_bytes() {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"{\"resourceType\":\"Patient\",\"id\":\"a\"}\n")
            .unwrap();
        let d = Dataset::load(DataSource::Files(vec![(
            "no-gz-suffix".into(),
            Bytes::from(gz.finish().unwrap()),
        )]))
        .unwrap();
        assert_eq!(d.counts()["Patient"], 1);
    }

    #[test]
    fn patient_ids_from_references() {
        assert_eq!(patient_id_of("Patient/1"), Some("1"));
        assert_eq!(
            patient_id_of("https://h/fhir/Patient/1/_history/3"),
            Some("1")
        );
        assert_eq!(patient_id_of("Patient?identifier=x|1"), None);
        assert_eq!(patient_id_of("Practitioner/1"), None);
    }
}
