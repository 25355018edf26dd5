//! Polling the status URL until the job is complete (partial manifests start downloads early).

use url::Url;

use super::{Tasks, parse_url};
use crate::{
    Result,
    client::{BulkClient, Manifest, PollOutcome},
    run::Progress,
};

/// Poll `status` until the job is complete, handing every partial manifest to `partial`;
/// returns the complete manifest's pages.
pub(super) async fn poll_until_complete(
    client: &BulkClient,
    status: &Url,
    progress: &Progress,
    mut partial: impl FnMut(&Manifest, &mut Tasks),
    tasks: &mut Tasks,
) -> Result<Vec<Manifest>> {
    let mut poll_url = status.clone();
    let mut wait = client.retry().base;
    let mut last_progress = String::new();
    loop {
        match client.poll(&poll_url).await? {
            PollOutcome::InProgress {
                progress: server_progress,
                retry_after,
                partial: page,
            } => {
                if let Some(p) = server_progress.filter(|p| *p != last_progress) {
                    tracing::info!(progress = %p, "export in progress");
                    progress.set_state(format!("server: {p}"));
                    last_progress = p;
                }
                if let Some(m) = page {
                    partial(&m, tasks);
                    if let Some(next) = m.next_page() {
                        poll_url = parse_url(next)?;
                        continue;
                    }
                }
                wait = match retry_after {
                    Some(r) => client.retry().clamp_poll(r),
                    None => client
                        .retry()
                        .next_backoff(wait)
                        .min(client.retry().max_poll_interval),
                };
                // After a `429` the server's pace is not trusted again (§5.2: slow down for good).
                wait = wait.max(client.poll_floor());
                tokio::time::sleep(wait).await;
            }
            PollOutcome::Complete(first) => {
                let mut pages = vec![first];
                while let Some(next) = pages.last().and_then(|m| m.next_page()).map(str::to_string)
                {
                    match client.fetch_page(&parse_url(&next)?).await? {
                        PollOutcome::Complete(m) => pages.push(m),
                        PollOutcome::InProgress { retry_after, .. } => {
                            tokio::time::sleep(
                                client
                                    .retry()
                                    .clamp_poll(retry_after.unwrap_or(wait))
                                    .max(client.poll_floor()),
                            )
                            .await;
                        }
                    }
                }
                return Ok(pages);
            }
        }
    }
}
