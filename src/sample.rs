//! The bundled sample: a small Synthea export (4 patients, one of them diabetic, with every
//! resource that references them), compiled into the binary so `flatfhir demo` and the tests need
//! no outside data. Synthetic data from SMART's bulk-data-server (Apache-2.0).

use std::path::{Path, PathBuf};

use crate::embedded::SAMPLE_FILES;

/// The Group in the sample that `flatfhir demo` exports (its 4 patients).
pub const DEMO_GROUP: &str = "demo-cohort";

/// SQL the demo runs, with a title each. The second is a quality-measure style query
/// (diabetic patients whose latest HbA1c is above 9%).
pub const DEMO_QUERIES: &[(&str, &str)] = &[
    (
        "Patients by gender",
        "SELECT gender, count(*) AS patients FROM patient_latest GROUP BY gender ORDER BY gender",
    ),
    (
        "Diabetic patients and their latest HbA1c (LOINC 4548-4)",
        "WITH a1c AS (SELECT patient_id, value_quantity, effective_date_time, \
         row_number() OVER (PARTITION BY patient_id ORDER BY effective_date_time DESC) AS n \
         FROM observation_latest WHERE code = '4548-4') \
         SELECT p.id, p.birth_date, a1c.value_quantity AS latest_hba1c, a1c.value_quantity > 9 AS above_9 \
         FROM patient_latest p JOIN condition_latest c ON c.patient_id = p.id AND c.code = '44054006' \
         LEFT JOIN a1c ON a1c.patient_id = p.id AND a1c.n = 1 ORDER BY p.id",
    ),
];

/// The sample's files: `(name, gzip bytes)`.
pub fn files() -> &'static [(&'static str, &'static [u8])] {
    SAMPLE_FILES
}

/// Write the sample files into `dir` (created if needed); returns their paths.
pub fn write_sample(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    SAMPLE_FILES
        .iter()
        .map(|(name, bytes)| {
            let p = dir.join(name);
            std::fs::write(&p, bytes)?;
            Ok(p)
        })
        .collect()
}
