//! Flattening schemas: SQL-on-FHIR v2 ViewDefinitions compiled once into Arrow schemas and
//! evaluators.
//!
//! The defaults in `schemas/` are compiled into the binary; `--schemas DIR` adds views or
//! replaces defaults of the same name. Each resource type has a *base view* named after it in
//! snake_case (`MedicationRequest` → `medication_request`), one row per resource, which also
//! carries the raw JSON in a `resource` column. A resource type without any view still lands, in
//! a generic base table (`id`, `resource_type`, `last_updated`, `resource`).
//!
//! # Example
//! ```
//! use flatfhir::view::ViewRegistry;
//! let reg = ViewRegistry::builtin().unwrap();
//! let patient = reg.base_view("Patient").unwrap();
//! assert_eq!(patient.name(), "patient");
//! assert!(patient.schema().field_with_name("birth_date").is_ok());
//! ```

pub mod compile;
pub mod definition;
mod dispatch;
pub mod fhirpath;
pub mod json;
mod root_scan;
pub mod types;

use std::{collections::BTreeMap, path::Path, sync::Arc};

pub use compile::{
    ColumnSpec, CompiledView, EvalBuffers, EvalError, EvalScratch, Given, Row, RowId, SharedColumns,
};
pub use root_scan::{RootScan, RootSites, ScannedRoot};
pub use types::{Cell, ColumnType};

use crate::embedded::DEFAULT_VIEWS;

/// Errors loading or compiling views.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    /// The ViewDefinition is invalid; `origin` is its file (or `<builtin>/name.json`).
    #[error("invalid ViewDefinition {origin}: {message}")]
    Invalid {
        /// File or description of where the view came from.
        origin: String,
        /// What is wrong, naming the column or path.
        message: String,
    },
    /// Two files of one schemas folder define a view of the same name (one would silently
    /// replace the other; replacing a built-in view by name is allowed).
    #[error("{first} and {second} both define the view `{name}`: give each view its own name")]
    DuplicateName {
        /// The view name.
        name: String,
        /// The file read first.
        first: String,
        /// The other file.
        second: String,
    },
    /// A schemas directory or file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// All views in use, by resource type.
#[derive(Debug, Clone, Default)]
pub struct ViewRegistry {
    by_name: BTreeMap<String, Arc<CompiledView>>,
    origin: BTreeMap<String, String>,
    raw: bool,
}

impl ViewRegistry {
    /// The built-in default views (with the raw `resource` column on base views).
    pub fn builtin() -> Result<Self, ViewError> {
        let mut reg = ViewRegistry {
            raw: true,
            ..Default::default()
        };
        for (file, text) in DEFAULT_VIEWS {
            reg.add_json(text, &format!("<builtin>/{file}"))?;
        }
        Ok(reg)
    }

    /// An empty registry (every type lands in its generic base table).
    pub fn empty() -> Self {
        ViewRegistry {
            raw: true,
            ..Default::default()
        }
    }

    /// Add (or replace, by name) one view from JSON text.
    pub fn add_json(&mut self, text: &str, origin: &str) -> Result<&CompiledView, ViewError> {
        let view = CompiledView::from_json(text, origin)?;
        Ok(self.insert(view, origin))
    }

    fn insert(&mut self, view: CompiledView, origin: &str) -> &CompiledView {
        let name = view.name().to_string();
        if !is_r4_resource_type(view.resource()) {
            // Not an error (a view may read a newer version's type), but a misspelled type
            // (`Patientt`) otherwise gives an empty table without a word.
            tracing::warn!(
                view = %name,
                origin,
                resource = view.resource(),
                "the view reads a resource type that FHIR R4 does not have; check its spelling"
            );
        }
        let is_base = name == snake_case(view.resource());
        let mut view = view;
        view.set_raw_column(self.raw && is_base);
        self.origin.insert(name.clone(), origin.to_string());
        self.by_name.insert(name.clone(), Arc::new(view));
        &self.by_name[&name]
    }

    /// Add (or replace, by name) a compiled view.
    pub fn insert_compiled(&mut self, view: CompiledView) -> &CompiledView {
        self.insert(view, "<compiled>")
    }

    /// A registry of flatfhir's own views, whose table names may start with `_`.
    pub(crate) fn internal(views: Vec<CompiledView>) -> Self {
        let mut reg = Self::empty().with_raw(false);
        for v in views {
            reg.insert(v, "<flatfhir>");
        }
        reg
    }

    /// Add every `*.json` file of a directory, replacing views of the same name added before
    /// (the built-in defaults); two files of the directory that name the same view are an
    /// error.
    pub fn add_dir(&mut self, dir: &Path) -> Result<usize, ViewError> {
        let io = |e| ViewError::Io {
            path: dir.display().to_string(),
            source: e,
        };
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        let mut seen: BTreeMap<String, &Path> = BTreeMap::new();
        for f in &files {
            let name = self.add_file(f)?.name().to_string();
            if let Some(first) = seen.insert(name.clone(), f) {
                return Err(ViewError::DuplicateName {
                    name,
                    first: first.display().to_string(),
                    second: f.display().to_string(),
                });
            }
        }
        Ok(files.len())
    }

    /// Add one ViewDefinition file.
    pub fn add_file(&mut self, file: &Path) -> Result<&CompiledView, ViewError> {
        let text = std::fs::read_to_string(file).map_err(|e| ViewError::Io {
            path: file.display().to_string(),
            source: e,
        })?;
        self.add_json(&text, &file.display().to_string())
    }

    /// Turn the raw `resource` column of base views on or off (`--no-raw`). Applies to the views
    /// already added (while the registry is not shared) and to those added later.
    pub fn with_raw(mut self, raw: bool) -> Self {
        self.raw = raw;
        for (name, v) in self.by_name.iter_mut() {
            if let Some(v) = Arc::get_mut(v) {
                let is_base = *name == snake_case(v.resource());
                v.set_raw_column(raw && is_base);
            }
        }
        self
    }

    /// [`CompiledView::set_member_dispatch`] for every view added so far (while the registry
    /// is not shared): lets tests compare the scan of each object once with member-by-member
    /// navigation.
    #[doc(hidden)]
    pub fn with_member_dispatch(mut self, on: bool) -> Self {
        for v in self.by_name.values_mut() {
            if let Some(v) = Arc::get_mut(v) {
                v.set_member_dispatch(on);
            }
        }
        self
    }

    /// Whether base views carry the raw `resource` column.
    pub fn raw(&self) -> bool {
        self.raw
    }

    /// Every view, by name.
    pub fn views(&self) -> impl Iterator<Item = &Arc<CompiledView>> {
        self.by_name.values()
    }

    /// A view by name.
    pub fn get(&self, name: &str) -> Option<&Arc<CompiledView>> {
        self.by_name.get(name)
    }

    /// Where a view was loaded from.
    pub fn origin(&self, name: &str) -> Option<&str> {
        self.origin.get(name).map(String::as_str)
    }

    /// Views over a resource type.
    pub fn views_for<'s>(
        &'s self,
        resource_type: &'s str,
    ) -> impl Iterator<Item = &'s Arc<CompiledView>> + 's {
        self.by_name
            .values()
            .filter(move |v| v.resource() == resource_type)
    }

    /// The base view of a resource type, if one is defined.
    pub fn base_view(&self, resource_type: &str) -> Option<&Arc<CompiledView>> {
        self.by_name
            .get(&snake_case(resource_type))
            .filter(|v| v.resource() == resource_type)
    }
}

/// `MedicationRequest` → `medication_request`.
pub fn snake_case(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    for (i, ch) in s.chars().enumerate() {
        if ch.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(ch.to_ascii_lowercase());
        } else {
            out.push(ch);
        }
    }
    out
}

/// The SQL-on-FHIR `sql-name` rule: `^[A-Za-z][A-Za-z0-9_]*$`.
pub fn is_sql_name(s: &str) -> bool {
    let mut b = s.bytes();
    b.next().is_some_and(|c| c.is_ascii_alphabetic())
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

/// A syntactically valid resource type name: `^[A-Z][A-Za-z0-9]{0,63}$`. Never a path.
pub fn is_valid_resource_type(s: &str) -> bool {
    let mut b = s.bytes();
    s.len() <= 64
        && b.next().is_some_and(|c| c.is_ascii_uppercase())
        && b.all(|c| c.is_ascii_alphanumeric())
}

/// Whether `s` is a FHIR R4 (4.0.1) resource type.
pub fn is_r4_resource_type(s: &str) -> bool {
    R4_RESOURCE_TYPES.binary_search(&s).is_ok()
}

/// The 146 concrete resource types of FHIR R4 (4.0.1), sorted.
pub const R4_RESOURCE_TYPES: &[&str] = &[
    "Account",
    "ActivityDefinition",
    "AdverseEvent",
    "AllergyIntolerance",
    "Appointment",
    "AppointmentResponse",
    "AuditEvent",
    "Basic",
    "Binary",
    "BiologicallyDerivedProduct",
    "BodyStructure",
    "Bundle",
    "CapabilityStatement",
    "CarePlan",
    "CareTeam",
    "CatalogEntry",
    "ChargeItem",
    "ChargeItemDefinition",
    "Claim",
    "ClaimResponse",
    "ClinicalImpression",
    "CodeSystem",
    "Communication",
    "CommunicationRequest",
    "CompartmentDefinition",
    "Composition",
    "ConceptMap",
    "Condition",
    "Consent",
    "Contract",
    "Coverage",
    "CoverageEligibilityRequest",
    "CoverageEligibilityResponse",
    "DetectedIssue",
    "Device",
    "DeviceDefinition",
    "DeviceMetric",
    "DeviceRequest",
    "DeviceUseStatement",
    "DiagnosticReport",
    "DocumentManifest",
    "DocumentReference",
    "EffectEvidenceSynthesis",
    "Encounter",
    "Endpoint",
    "EnrollmentRequest",
    "EnrollmentResponse",
    "EpisodeOfCare",
    "EventDefinition",
    "Evidence",
    "EvidenceVariable",
    "ExampleScenario",
    "ExplanationOfBenefit",
    "FamilyMemberHistory",
    "Flag",
    "Goal",
    "GraphDefinition",
    "Group",
    "GuidanceResponse",
    "HealthcareService",
    "ImagingStudy",
    "Immunization",
    "ImmunizationEvaluation",
    "ImmunizationRecommendation",
    "ImplementationGuide",
    "InsurancePlan",
    "Invoice",
    "Library",
    "Linkage",
    "List",
    "Location",
    "Measure",
    "MeasureReport",
    "Media",
    "Medication",
    "MedicationAdministration",
    "MedicationDispense",
    "MedicationKnowledge",
    "MedicationRequest",
    "MedicationStatement",
    "MedicinalProduct",
    "MedicinalProductAuthorization",
    "MedicinalProductContraindication",
    "MedicinalProductIndication",
    "MedicinalProductIngredient",
    "MedicinalProductInteraction",
    "MedicinalProductManufactured",
    "MedicinalProductPackaged",
    "MedicinalProductPharmaceutical",
    "MedicinalProductUndesirableEffect",
    "MessageDefinition",
    "MessageHeader",
    "MolecularSequence",
    "NamingSystem",
    "NutritionOrder",
    "Observation",
    "ObservationDefinition",
    "OperationDefinition",
    "OperationOutcome",
    "Organization",
    "OrganizationAffiliation",
    "Parameters",
    "Patient",
    "PaymentNotice",
    "PaymentReconciliation",
    "Person",
    "PlanDefinition",
    "Practitioner",
    "PractitionerRole",
    "Procedure",
    "Provenance",
    "Questionnaire",
    "QuestionnaireResponse",
    "RelatedPerson",
    "RequestGroup",
    "ResearchDefinition",
    "ResearchElementDefinition",
    "ResearchStudy",
    "ResearchSubject",
    "RiskAssessment",
    "RiskEvidenceSynthesis",
    "Schedule",
    "SearchParameter",
    "ServiceRequest",
    "Slot",
    "Specimen",
    "SpecimenDefinition",
    "StructureDefinition",
    "StructureMap",
    "Subscription",
    "Substance",
    "SubstanceNucleicAcid",
    "SubstancePolymer",
    "SubstanceProtein",
    "SubstanceReferenceInformation",
    "SubstanceSourceMaterial",
    "SubstanceSpecification",
    "SupplyDelivery",
    "SupplyRequest",
    "Task",
    "TerminologyCapabilities",
    "TestReport",
    "TestScript",
    "ValueSet",
    "VerificationResult",
    "VisionPrescription",
];

#[cfg(test)]
mod tests {
    use super::*;

    const OBS_EXTRA: &str = r#"{"resourceType":"ViewDefinition","name":"obs_extra",
        "resource":"Observation","select":[{"column":[{"name":"id","path":"id"}]}]}"#;

    #[test]
    fn two_files_of_a_folder_naming_one_view_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("obs_lab.json"), OBS_EXTRA).unwrap();
        std::fs::write(dir.path().join("obs_vitals.json"), OBS_EXTRA).unwrap();
        let err = ViewRegistry::builtin()
            .unwrap()
            .add_dir(dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("obs_lab.json") && err.contains("obs_vitals.json"),
            "{err}"
        );
        assert!(err.contains("`obs_extra`"), "{err}");
    }

    #[test]
    fn a_folder_view_replaces_a_builtin_of_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let patient = r#"{"resourceType":"ViewDefinition","name":"patient","resource":"Patient",
            "select":[{"column":[{"name":"id","path":"id"}]}]}"#;
        std::fs::write(dir.path().join("patient.json"), patient).unwrap();
        std::fs::write(dir.path().join("obs.json"), OBS_EXTRA).unwrap();
        let mut reg = ViewRegistry::builtin().unwrap();
        assert_eq!(reg.add_dir(dir.path()).unwrap(), 2);
        let origin = reg.origin("patient").unwrap();
        assert!(origin.ends_with("patient.json") && !origin.starts_with("<builtin>"));
    }

    #[test]
    fn names() {
        assert_eq!(snake_case("ExplanationOfBenefit"), "explanation_of_benefit");
        assert!(
            is_sql_name("a_1") && !is_sql_name("1a") && !is_sql_name("a-b") && !is_sql_name("")
        );
        assert!(is_valid_resource_type("Patient"));
        assert!(
            !is_valid_resource_type("../x")
                && !is_valid_resource_type("patient")
                && !is_valid_resource_type("")
        );
        assert!(R4_RESOURCE_TYPES.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(R4_RESOURCE_TYPES.len(), 146);
        assert!(is_r4_resource_type("Observation") && !is_r4_resource_type("Foo"));
    }
}
