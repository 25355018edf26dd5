//! The serde model of a SQL-on-FHIR v2 ViewDefinition.
//!
//! Deliberately lenient about metadata (`resourceType` spelled three ways in the wild, `status`
//! often missing in test views, `identifier` as object or array): only the expressive part —
//! `resource`, `constant`, `select`, `where` — is modelled and checked. Unknown keys are ignored.

use serde::Deserialize;
use serde_json::Value;

/// A ViewDefinition as written in JSON.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ViewDefinition {
    /// Table name; must match `^[A-Za-z][A-Za-z0-9_]*$`.
    pub name: Option<String>,
    /// The FHIR resource type the view runs over.
    pub resource: Option<String>,
    /// Human description.
    pub description: Option<String>,
    /// `%name` constants.
    #[serde(default)]
    pub constant: Vec<ConstantDef>,
    /// Top-level selects; their rows are cross-joined.
    #[serde(default)]
    pub select: Vec<Select>,
    /// Filters: every path must be `true` for a resource to produce rows.
    #[serde(rename = "where", default)]
    pub where_: Vec<WhereDef>,
}

/// One `constant` entry: a name and exactly one `value[x]`.
#[derive(Debug, Clone, Deserialize)]
pub struct ConstantDef {
    /// Referenced as `%name`.
    pub name: String,
    /// Every other key: the `value[x]` (e.g. `valueString`).
    #[serde(flatten)]
    pub rest: serde_json::Map<String, Value>,
}

/// One `where` entry.
#[derive(Debug, Clone, Deserialize)]
pub struct WhereDef {
    /// A FHIRPath expression that must evaluate to `true`.
    pub path: String,
    /// Human description.
    pub description: Option<String>,
}

/// A selection structure.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Select {
    /// Columns of this select.
    #[serde(default)]
    pub column: Vec<ColumnDef>,
    /// Nested selects (cross-joined with the columns).
    #[serde(default)]
    pub select: Vec<Select>,
    /// One row per item of this path (inner join).
    pub for_each: Option<String>,
    /// One row per item of this path, or one row of nulls (outer join).
    pub for_each_or_null: Option<String>,
    /// Paths followed recursively; every node reached is a focus.
    #[serde(default)]
    pub repeat: Vec<String>,
    /// Branches whose rows are concatenated.
    #[serde(default)]
    pub union_all: Vec<Select>,
}

/// A column.
#[derive(Debug, Clone, Deserialize)]
pub struct ColumnDef {
    /// Column name; unique in the view.
    pub name: String,
    /// FHIRPath expression relative to the current focus.
    pub path: String,
    /// Human description.
    pub description: Option<String>,
    /// `true` to keep every value as a list; otherwise more than one value is an error.
    #[serde(default)]
    pub collection: bool,
    /// FHIR type code (e.g. `string`, `dateTime`).
    #[serde(rename = "type")]
    pub type_: Option<String>,
    /// Tags; `ansi/type` selects a native SQL type.
    #[serde(default, alias = "tags")]
    pub tag: Vec<Tag>,
}

/// A column tag.
#[derive(Debug, Clone, Deserialize)]
pub struct Tag {
    /// e.g. `ansi/type`.
    pub name: String,
    /// e.g. `DATE`.
    pub value: String,
}
