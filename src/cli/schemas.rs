//! `flatfhir schemas`: the views in use.

use std::io::Write;

use anyhow::{Result, bail};
use clap::Subcommand;

use super::{Outcome, args::SchemaArgs, output};

#[derive(Debug, Subcommand)]
pub enum SchemasCommand {
    /// List the views: name, resource type, columns, origin.
    List(SchemaArgs),
    /// Show one view's columns.
    Show {
        /// View name.
        name: String,
        #[command(flatten)]
        schema: SchemaArgs,
    },
}

fn schemas_list(s: &SchemaArgs) -> Result<Outcome> {
    let reg = s.registry()?;
    let mut out = std::io::stdout().lock();
    let rows: Vec<Vec<String>> = reg
        .views()
        .map(|v| {
            vec![
                v.name().to_string(),
                v.resource().to_string(),
                v.schema().fields().len().to_string(),
                reg.origin(v.name()).unwrap_or_default().to_string(),
            ]
        })
        .collect();
    output::write_text_table(&mut out, &["view", "resource", "columns", "origin"], &rows)?;
    Ok(Outcome::Success)
}

fn schemas_show(name: &str, s: &SchemaArgs) -> Result<Outcome> {
    let reg = s.registry()?;
    let Some(v) = reg.get(name) else {
        bail!("no view named {name:?}; `flatfhir schemas list` shows them");
    };
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{} — resource {} ({})",
        v.name(),
        v.resource(),
        reg.origin(name).unwrap_or_default()
    )?;
    if let Some(d) = v.description() {
        writeln!(out, "{d}")?;
    }
    let mut rows: Vec<Vec<String>> = v
        .columns()
        .iter()
        .zip(v.schema().fields())
        .map(|(c, f)| {
            vec![
                c.name.clone(),
                f.data_type().to_string(),
                c.fhir_type.clone(),
                c.path.clone(),
            ]
        })
        .collect();
    if v.raw_column() {
        rows.push(vec![
            "resource".into(),
            "Utf8".into(),
            "json".into(),
            "(the raw resource)".into(),
        ]);
    }
    output::write_text_table(
        &mut out,
        &["column", "arrow type", "fhir type", "path"],
        &rows,
    )?;
    Ok(Outcome::Success)
}

pub fn run(c: SchemasCommand) -> Result<Outcome> {
    match c {
        SchemasCommand::List(s) => schemas_list(&s),
        SchemasCommand::Show { name, schema } => schemas_show(&name, &schema),
    }
}
