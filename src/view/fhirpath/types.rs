//! Values, errors, constants and the FHIR type tables the evaluator consults.

use std::borrow::Cow;

use crate::view::json::{Json, JsonRef, json_ref, member_str, number_text};

/// One item of a FHIRPath collection.
///
/// Items either borrow a node of the input JSON ([`Item::Json`]) or are values computed by the
/// expression (literals, operator and function results). Computed text borrows from the input
/// where it can, hence the `Cow`s.
#[derive(Clone, Debug)]
pub enum Item<'a> {
    /// A node of the input JSON. `fhir_type` is the FHIR type when known, e.g. from a choice-type
    /// key suffix (`valueQuantity` -> "Quantity", `valueString` -> "string", `effectiveInstant` ->
    /// "instant") or from `ofType(T)`.
    Json {
        /// The JSON node (never `null`: nulls are skipped during navigation).
        value: Json<'a>,
        /// FHIR type name when known (always one of the static type names, or the
        /// `resourceType` of a resource).
        fhir_type: Option<&'a str>,
    },
    /// A FHIRPath Boolean.
    Boolean(bool),
    /// A FHIRPath Integer.
    Integer(i64),
    /// A FHIRPath Decimal in lexical form, e.g. "1.50".
    Decimal(Cow<'a, str>),
    /// A FHIRPath String.
    String(Cow<'a, str>),
    /// A FHIRPath Date in lexical form (`2020`, `2020-01`, `2020-01-02`).
    Date(Cow<'a, str>),
    /// A FHIRPath DateTime in lexical form, e.g. `2020-01-02T10:00:00.000+02:00`.
    DateTime(Cow<'a, str>),
    /// A FHIRPath Time in lexical form, e.g. `12:34:00.000` (no `T` prefix).
    Time(Cow<'a, str>),
}

impl<'a> Item<'a> {
    /// An input node with unknown type.
    pub fn json(value: impl std::borrow::Borrow<Json<'a>>) -> Item<'a> {
        Item::Json {
            value: *value.borrow(),
            fhir_type: None,
        }
    }

    /// The FHIR type name of this item when it is known: the tagged type of a JSON node, the
    /// `resourceType` of a resource, or the FHIRPath system type of a computed value
    /// (`boolean`, `integer`, `decimal`, `string`, `date`, `dateTime`, `time`).
    pub fn type_name(&self) -> Option<&'a str> {
        match self {
            Item::Json { value, fhir_type } => {
                fhir_type.or_else(|| member_str(value, "resourceType"))
            }
            Item::Boolean(_) => Some("boolean"),
            Item::Integer(_) => Some("integer"),
            Item::Decimal(_) => Some("decimal"),
            Item::String(_) => Some("string"),
            Item::Date(_) => Some("date"),
            Item::DateTime(_) => Some("dateTime"),
            Item::Time(_) => Some("time"),
        }
    }

    /// The text of a primitive item (strings, codes, dates, numbers in lexical form, booleans as
    /// `true`/`false`); `None` for objects and arrays.
    pub fn primitive_text(&self) -> Option<Cow<'a, str>> {
        match self {
            Item::Json { value, .. } => match json_ref(value) {
                JsonRef::String(s) => Some(Cow::Borrowed(s)),
                JsonRef::Bool(b) => Some(Cow::Borrowed(if b { "true" } else { "false" })),
                JsonRef::Number(n) => Some(number_text(n)),
                _ => None,
            },
            Item::Boolean(b) => Some(Cow::Borrowed(if *b { "true" } else { "false" })),
            Item::Integer(i) => Some(Cow::Owned(i.to_string())),
            Item::Decimal(s)
            | Item::String(s)
            | Item::Date(s)
            | Item::DateTime(s)
            | Item::Time(s) => Some(s.clone()),
        }
    }
}

/// A literal: FHIR type name plus value. Used for user constants (`ViewDefinition.constant`).
#[derive(Clone, Debug, PartialEq)]
pub enum Literal {
    /// `valueBoolean`.
    Boolean(bool),
    /// `valueInteger`, `valuePositiveInt`, `valueUnsignedInt` (the FHIR type is reported as
    /// `integer`).
    Integer(i64),
    /// `valueDecimal`, in lexical form (e.g. "1.20").
    Decimal(String),
    /// Any string-like type: `string`, `code`, `id`, `uri`, `url`, `canonical`, `oid`, `uuid`,
    /// `markdown`, `base64Binary`, ...
    String {
        /// The FHIR type name, e.g. "code".
        fhir_type: String,
        /// The value.
        value: String,
    },
    /// `valueDate`.
    Date(String),
    /// `valueDateTime` or `valueInstant`.
    DateTime {
        /// `dateTime` or `instant`.
        fhir_type: String,
        /// The lexical value.
        value: String,
    },
    /// `valueTime`.
    Time(String),
}

impl Literal {
    /// The FHIR type name of the literal.
    pub fn fhir_type(&self) -> &str {
        match self {
            Literal::Boolean(_) => "boolean",
            Literal::Integer(_) => "integer",
            Literal::Decimal(_) => "decimal",
            Literal::String { fhir_type, .. } | Literal::DateTime { fhir_type, .. } => fhir_type,
            Literal::Date(_) => "date",
            Literal::Time(_) => "time",
        }
    }

    /// The literal as a FHIRPath item.
    pub fn to_item(&self) -> Item<'static> {
        match self {
            Literal::Boolean(b) => Item::Boolean(*b),
            Literal::Integer(i) => Item::Integer(*i),
            Literal::Decimal(d) => Item::Decimal(Cow::Owned(d.clone())),
            Literal::String { value, .. } => Item::String(Cow::Owned(value.clone())),
            Literal::Date(d) => Item::Date(Cow::Owned(d.clone())),
            Literal::DateTime { value, .. } => Item::DateTime(Cow::Owned(value.clone())),
            Literal::Time(t) => Item::Time(Cow::Owned(t.clone())),
        }
    }
}

/// User constants (`ViewDefinition.constant`): name -> literal value with its FHIR type.
///
/// `%name` in an expression is replaced by the constant at compile time; a name inserted twice
/// keeps the last value.
#[derive(Clone, Debug, Default)]
pub struct Constants {
    entries: Vec<(String, Literal)>,
}

impl Constants {
    /// No constants.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add (or replace) the constant `name` (without the `%`).
    pub fn insert(&mut self, name: &str, value: Literal) {
        if let Some(slot) = self.entries.iter_mut().find(|(n, _)| n == name) {
            slot.1 = value;
        } else {
            self.entries.push((name.to_string(), value));
        }
    }

    /// The constant called `name`, if any.
    pub fn get(&self, name: &str) -> Option<&Literal> {
        self.entries.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// Number of constants.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there are no constants.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Evaluation environment: what `%resource`/`%rootResource`/`%context`, `getResourceKey()` and
/// `%rowIndex` refer to.
#[derive(Clone, Copy, Debug)]
pub struct Env<'a> {
    /// The resource being flattened.
    pub resource: Json<'a>,
    /// The value of `%rowIndex` (0-based index of the current `forEach` item).
    pub row_index: i64,
}

impl<'a> Env<'a> {
    /// An environment for `resource` with `%rowIndex` = 0.
    pub fn new(resource: impl std::borrow::Borrow<Json<'a>>) -> Env<'a> {
        let resource = *resource.borrow();
        Env {
            resource,
            row_index: 0,
        }
    }
}

/// Errors from compiling or evaluating a FHIRPath expression. Every message names the
/// expression.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum FhirPathError {
    /// The expression is not valid FHIRPath syntax.
    #[error("invalid FHIRPath `{expr}` at offset {position}: {message}")]
    Parse {
        /// The expression source.
        expr: String,
        /// Byte offset of the offending token.
        position: usize,
        /// What is wrong.
        message: String,
    },
    /// `%name` names neither a user constant nor a built-in variable.
    #[error("FHIRPath `{expr}` at offset {position}: unknown constant %{name}")]
    UnknownConstant {
        /// The expression source.
        expr: String,
        /// Byte offset of the `%`.
        position: usize,
        /// The constant name without `%`.
        name: String,
    },
    /// The function is not implemented (or does not exist).
    #[error("FHIRPath `{expr}` at offset {position}: unknown or unsupported function {name}()")]
    UnknownFunction {
        /// The expression source.
        expr: String,
        /// Byte offset of the function name.
        position: usize,
        /// The function name.
        name: String,
    },
    /// A function was called with the wrong number or kind of arguments.
    #[error("FHIRPath `{expr}` at offset {position}: {name}() {message}")]
    Arguments {
        /// The expression source.
        expr: String,
        /// Byte offset of the function name.
        position: usize,
        /// The function name.
        name: String,
        /// What is expected.
        message: String,
    },
    /// An operand or function input has a type the operation does not accept.
    #[error("FHIRPath `{expr}`: {message}")]
    Type {
        /// The expression source.
        expr: String,
        /// What is wrong.
        message: String,
    },
    /// Evaluation failed, e.g. a singleton was expected and several items were found.
    #[error("FHIRPath `{expr}`: {message}")]
    Eval {
        /// The expression source.
        expr: String,
        /// What is wrong.
        message: String,
    },
    /// The expression nests deeper than the parser allows.
    #[error("FHIRPath `{expr}` nests deeper than {limit} levels")]
    TooDeep {
        /// The expression source (truncated to 200 characters).
        expr: String,
        /// The nesting limit.
        limit: usize,
    },
}

/// An evaluation failure without the expression text (added by `Expression::evaluate`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum EvalError {
    /// Wrong operand type.
    Type(String),
    /// Other evaluation failure.
    Eval(String),
}

impl EvalError {
    pub(crate) fn with_expr(self, expr: &str) -> FhirPathError {
        match self {
            EvalError::Type(message) => FhirPathError::Type {
                expr: expr.to_string(),
                message,
            },
            EvalError::Eval(message) => FhirPathError::Eval {
                expr: expr.to_string(),
                message,
            },
        }
    }
}

/// Result of the internal evaluator.
pub(crate) type EvalResult<T> = Result<T, EvalError>;

/// FHIR R4/R5 primitive type names (JSON representation in comments is irrelevant here).
pub(crate) const PRIMITIVE_TYPES: &[&str] = &[
    "base64Binary",
    "boolean",
    "canonical",
    "code",
    "date",
    "dateTime",
    "decimal",
    "id",
    "instant",
    "integer",
    "integer64",
    "markdown",
    "oid",
    "positiveInt",
    "string",
    "time",
    "unsignedInt",
    "uri",
    "url",
    "uuid",
    "xhtml",
];

/// FHIR complex data type names (R4 plus the R5 additions that appear in choice types).
pub(crate) const COMPLEX_TYPES: &[&str] = &[
    "Address",
    "Age",
    "Annotation",
    "Attachment",
    "Availability",
    "BackboneElement",
    "BackboneType",
    "CodeableConcept",
    "CodeableReference",
    "Coding",
    "ContactDetail",
    "ContactPoint",
    "Contributor",
    "Count",
    "DataRequirement",
    "DataType",
    "Distance",
    "Dosage",
    "Duration",
    "Element",
    "ElementDefinition",
    "Expression",
    "ExtendedContactDetail",
    "Extension",
    "HumanName",
    "Identifier",
    "MarketingStatus",
    "Meta",
    "MonetaryComponent",
    "Money",
    "MoneyQuantity",
    "Narrative",
    "ParameterDefinition",
    "Period",
    "Population",
    "PrimitiveType",
    "ProdCharacteristic",
    "ProductShelfLife",
    "Quantity",
    "Range",
    "Ratio",
    "RatioRange",
    "Reference",
    "RelatedArtifact",
    "SampledData",
    "Signature",
    "SimpleQuantity",
    "SubstanceAmount",
    "Timing",
    "TriggerDefinition",
    "UsageContext",
    "VirtualServiceDetail",
];

/// The static name of a FHIR data type (primitive or complex), if `name` is one.
pub(crate) fn static_type_name(name: &str) -> Option<&'static str> {
    PRIMITIVE_TYPES
        .iter()
        .chain(COMPLEX_TYPES.iter())
        .find(|t| **t == name)
        .copied()
}

/// The FHIR type encoded by a choice-element key suffix (`Quantity` -> `Quantity`,
/// `DateTime` -> `dateTime`, `Base64Binary` -> `base64Binary`).
pub(crate) fn choice_suffix_type(suffix: &str) -> Option<&'static str> {
    let mut chars = suffix.chars();
    let first = chars.next()?;
    if !first.is_ascii_uppercase() {
        return None;
    }
    let rest = chars.as_str();
    if let Some(t) = COMPLEX_TYPES.iter().find(|t| **t == suffix) {
        return Some(t);
    }
    PRIMITIVE_TYPES
        .iter()
        .find(|t| {
            let mut tc = t.chars();
            tc.next().map(|c| c.to_ascii_uppercase()) == Some(first) && tc.as_str() == rest
        })
        .copied()
}

/// The base type of a FHIR type per the R4 StructureDefinitions (`code` -> `string`, `url` ->
/// `uri`, `Age` -> `Quantity`, ...), or `None` for a root type.
pub(crate) fn fhir_base_type(name: &str) -> Option<&'static str> {
    Some(match name {
        "code" | "id" | "markdown" => "string",
        "url" | "canonical" | "oid" | "uuid" => "uri",
        "positiveInt" | "unsignedInt" => "integer",
        "Age" | "Count" | "Distance" | "Duration" | "MoneyQuantity" | "SimpleQuantity" => {
            "Quantity"
        }
        _ => return None,
    })
}

/// True when some type has `name` as its base ([`fhir_base_type`]): only then can a value of
/// another type be of type `name`.
pub(crate) fn has_specialisations(name: &str) -> bool {
    matches!(name, "string" | "uri" | "integer" | "Quantity")
}

/// True when `actual` is `wanted` or a specialisation of it.
pub(crate) fn fhir_type_is(actual: &str, wanted: &str) -> bool {
    let mut cur = actual;
    for _ in 0..4 {
        if cur == wanted {
            return true;
        }
        match fhir_base_type(cur) {
            Some(b) => cur = b,
            None => return false,
        }
    }
    false
}

/// FHIR primitive types whose JSON form is a string.
pub(crate) fn is_json_string_type(name: &str) -> bool {
    matches!(
        name,
        "base64Binary"
            | "canonical"
            | "code"
            | "date"
            | "dateTime"
            | "id"
            | "instant"
            | "integer64"
            | "markdown"
            | "oid"
            | "string"
            | "time"
            | "uri"
            | "url"
            | "uuid"
            | "xhtml"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choice_suffixes() {
        assert_eq!(choice_suffix_type("Quantity"), Some("Quantity"));
        assert_eq!(choice_suffix_type("DateTime"), Some("dateTime"));
        assert_eq!(choice_suffix_type("Base64Binary"), Some("base64Binary"));
        assert_eq!(choice_suffix_type("Uuid"), Some("uuid"));
        assert_eq!(choice_suffix_type("Set"), None);
        assert_eq!(choice_suffix_type(""), None);
        assert_eq!(choice_suffix_type("quantity"), None);
    }

    #[test]
    fn type_hierarchy() {
        assert!(fhir_type_is("code", "string"));
        assert!(fhir_type_is("uuid", "uri"));
        assert!(fhir_type_is("Age", "Quantity"));
        assert!(!fhir_type_is("url", "id"));
        assert!(!fhir_type_is("string", "code"));
        // `has_specialisations` names every base type there is.
        for t in PRIMITIVE_TYPES.iter().chain(COMPLEX_TYPES) {
            if let Some(base) = fhir_base_type(t) {
                assert!(has_specialisations(base), "{t} -> {base}");
            }
        }
    }

    #[test]
    fn constants_replace() {
        let mut c = Constants::new();
        c.insert("a", Literal::Integer(1));
        c.insert("a", Literal::Integer(2));
        assert_eq!(c.len(), 1);
        assert_eq!(c.get("a"), Some(&Literal::Integer(2)));
        assert!(c.get("b").is_none());
    }

    #[test]
    fn item_type_names() {
        let v = crate::view::json::json_doc!({"resourceType": "Patient"});
        assert_eq!(Item::json(v).type_name(), Some("Patient"));
        assert_eq!(Item::Integer(1).type_name(), Some("integer"));
    }
}
