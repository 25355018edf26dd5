-- Quality-measure style query over flatfhir's default views:
-- patients with a diabetes condition (SNOMED 44054006) whose latest HbA1c (LOINC 4548-4) is above 9%,
-- over the current state (the `_latest` tables: one version of each resource, however many runs).
--   flatfhir query --data DIR --file examples/quality_measure.sql
WITH latest_a1c AS (
  SELECT patient_id, value_quantity, value_unit, effective_date_time,
         row_number() OVER (PARTITION BY patient_id ORDER BY effective_date_time DESC) AS n
  FROM observation_latest
  WHERE code_system = 'http://loinc.org' AND code = '4548-4'
),
diabetic AS (
  SELECT DISTINCT patient_id FROM condition_latest
  WHERE code_system = 'http://snomed.info/sct' AND code = '44054006'
)
SELECT p.id AS patient_id, p.gender, p.birth_date,
       a.value_quantity AS latest_hba1c, a.value_unit, a.effective_date_time AS measured_at,
       a.value_quantity > 9 AS poor_control
FROM patient_latest p
JOIN diabetic d ON d.patient_id = p.id
JOIN latest_a1c a ON a.patient_id = p.id AND a.n = 1
ORDER BY p.id;
