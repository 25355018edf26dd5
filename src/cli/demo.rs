//! `flatfhir demo`: the whole pipeline end to end on the bundled sample.

use std::{io::Write, sync::Arc};

use anyhow::Result;
use clap::Args;

use flatfhir::{
    auth::{PrivateKey, SigningAlg},
    client::{
        Auth, BulkClientBuilder, ExportLevel, ExportRequest, RetryConfig, SmartAuth, SmartConfig,
        smart::export_scope,
    },
    dataset::DatasetLocation,
    query::Dataset,
    run::{Progress, export::ExportBuilder},
    serve::{AuthClient, DataSource, ServerBuilder},
    view::ViewRegistry,
};

use super::{Outcome, export::finish_export, output, progress};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where to write the demo dataset.
    #[arg(long, default_value = "flatfhir-demo")]
    out: String,
}

pub async fn run(a: DemoArgs, quiet: bool) -> Result<Outcome> {
    let files = flatfhir::sample::files()
        .iter()
        .map(|(name, bytes)| (name.to_string(), bytes::Bytes::from_static(bytes)))
        .collect();
    // SMART Backend Services end to end: a key made for this run, registered with the server.
    let key = PrivateKey::generate(SigningAlg::Es384)?;
    let client_id = "flatfhir-demo";
    let registered =
        AuthClient::from_jwks_json(Some(client_id.into()), &key.public_jwks().to_string())?;
    let kid = key.kid().to_string();
    let server = ServerBuilder::new(DataSource::Files(files))
        .with_delay(std::time::Duration::from_millis(1500))
        .with_resources_per_file(500)
        .with_smart_clients(vec![registered])
        .start()
        .await?;
    eprintln!(
        "flatfhir demo: built-in Bulk Data server on {} with the bundled sample; exporting Group/{} into {}/",
        server.base_url(),
        flatfhir::sample::DEMO_GROUP,
        a.out
    );
    eprintln!(
        "flatfhir demo: authorizing with SMART Backend Services as {client_id:?} (ES384 key generated for this run, kid {kid})"
    );
    let location = DatasetLocation::resolve(&a.out, true)?;
    let smart = SmartAuth::new(
        SmartConfig {
            scope: export_scope(None, false, true),
            ..SmartConfig::new(client_id, key)
        },
        server.base_url().clone(),
    )?;
    let client = BulkClientBuilder::new(server.base_url().clone())
        .with_auth(Auth::Smart(Arc::new(smart)))
        .with_retry(RetryConfig {
            base: std::time::Duration::from_millis(200),
            ..Default::default()
        })
        .build()?;
    let request = ExportRequest {
        level: Some(ExportLevel::Group(flatfhir::sample::DEMO_GROUP.into())),
        ..Default::default()
    };
    let progress = Arc::new(Progress::default());
    let display = progress::ProgressDisplay::start(progress.clone(), 0, 0, quiet);
    let registry = Arc::new(ViewRegistry::builtin()?);
    let summary = ExportBuilder::new(client, registry, location.clone())
        .with_request(request)
        .with_progress(progress)
        .run()
        .await;
    display.stop();
    server.shutdown().await;
    let outcome = finish_export(&summary?, &a.out, false, None)?;
    let ds = Dataset::open(&location).await?;
    let mut stdout = std::io::stdout().lock();
    for (title, sql) in flatfhir::sample::DEMO_QUERIES {
        writeln!(stdout, "\n{title}\n  {sql}")?;
        output::write_table(&mut stdout, &ds.sql(sql).await?, false)?;
    }
    writeln!(
        stdout,
        "\nTry: flatfhir query --data {} \"select * from observation_latest limit 5\"",
        a.out
    )?;
    Ok(outcome)
}
