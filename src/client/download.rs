//! One manifest file as a resumable stream of body bytes: [`BulkClient::download`] →
//! [`Download`] (`Stream<Item = Result<Bytes, ClientError>>`).
//!
//! ```text
//!  GET url ──3xx──► Location (resolved against the current URL) ──3xx──► … ≤ max_redirects
//!     │    every hop re-decides: token + --header only to the FHIR origin / --allow-token-host
//!     ▼
//!  200/206 body ──chunk──► caller          (each chunk within the idle timeout)
//!     │ cut or stalled, identity-encoded, Accept-Ranges: bytes, resumes left
//!     ▼
//!  GET url, Range: bytes=N- ──► 206 from N ──► same stream, no gap, no duplicate
//!     otherwise: the error (retryable when a fresh attempt may help) ends the stream
//! ```
//!
//! Why redirects are followed by hand: several EHRs (Oracle Health/Cerner among them) answer
//! every file URL with a redirect to object storage. reqwest's redirect policy would carry the
//! request's headers along, so the client keeps `Policy::none()` and follows file redirects
//! itself, deciding per hop whether the access token and the user's extra headers may go there
//! (C12, C24). Kick-off and status requests never follow redirects: a POST must not be replayed
//! silently, and a status URL that moves is a server bug worth seeing.
//!
//! The bytes are the body as sent: gzip-encoded when [`Download::gzip`] is true. Inflating is
//! the caller's job, off the I/O runtime (for instance a blocking `Read` adapter under
//! `flate2::read::MultiGzDecoder`, so memory stays bounded whatever the ratio). A gzip body
//! cannot be resumed by byte offset (`Range` counts encoded bytes of an encoding the server may
//! not reproduce), so a cut gzip body ends the stream with a retryable error and the caller
//! starts the file over.
//!
//! # Example
//!
//! ```no_run
//! use futures::TryStreamExt;
//! # async fn run(client: flatfhir::client::BulkClient, url: url::Url) -> Result<(), flatfhir::client::ClientError> {
//! let mut download = client.download(&url, true).await?;
//! let mut body = Vec::new();
//! while let Some(chunk) = download.try_next().await? {
//!     body.extend_from_slice(&chunk);
//! }
//! assert!(download.resumes() <= client.retry().max_retries);
//! println!("{} bytes from {} (gzip: {})", body.len(), download.url(), download.gzip());
//! # Ok(()) }
//! ```

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt, future::BoxFuture, stream::BoxStream};
use reqwest::{StatusCode, header::HeaderValue};
use url::Url;

use super::{BulkClient, ClientError, FileResponse, error::redact};

/// Default idle timeout: the longest a request may go without receiving anything (response
/// headers, or the next body chunk) before its connection is dropped and the request retried.
/// Generous, because some servers think for minutes before the first byte of a large file.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// Default most redirects followed for one file request (a chain longer than this is refused).
pub const DEFAULT_MAX_REDIRECTS: u32 = 5;

impl BulkClient {
    /// Open a file download (a manifest `output`, `deleted` or `error` URL).
    ///
    /// Redirects (`301`, `302`, `303`, `307`, `308`) are followed, at most
    /// [`max_redirects`](super::BulkClientBuilder::with_max_redirects) hops, http(s) only and
    /// never from https to http. The access token goes only to hops that may receive it
    /// ([`token_allowed`](Self::token_allowed)) and only when `requires_token` (the manifest's
    /// `requiresAccessToken`); the user's extra headers also go only to those hops. Transient
    /// failures (5xx, 429, network errors, an idle timeout) are retried with backoff, and a `401`
    /// with SMART auth renews the token once. The download holds a slot of the client's
    /// concurrency limit ([`with_max_concurrent_requests`](super::BulkClientBuilder::with_max_concurrent_requests))
    /// until it is read to the end or dropped.
    #[tracing::instrument(level = "debug", skip(self, url), fields(url = %redact(url)))]
    pub async fn download(&self, url: &Url, requires_token: bool) -> Result<Download, ClientError> {
        let first = self.open_file(url, requires_token, 0).await?;
        Ok(Download::new(
            self.clone(),
            url.clone(),
            requires_token,
            first,
        ))
    }
}

/// The body of one manifest file as a stream of raw bytes, gzip-encoded when
/// [`gzip`](Self::gzip) is true (the caller inflates, off the I/O runtime).
///
/// A cut identity-encoded body from a server that accepts byte ranges is resumed with
/// `Range: bytes=N-` transparently, at most [`RetryConfig::max_retries`](super::RetryConfig)
/// times per file; a server that then ignores the `Range` is a [`ClientError::Protocol`]. The
/// idle timeout ([`DEFAULT_IDLE_TIMEOUT`] unless set with
/// [`with_idle_timeout`](super::BulkClientBuilder::with_idle_timeout)) applies to every chunk,
/// and a stall counts as a cut. Any other failure is the stream's last item; it is retryable
/// ([`ClientError::is_retryable`]) when starting the file over may help.
pub struct Download {
    client: BulkClient,
    /// The manifest URL (resumes start from it again, so expiring signed redirect targets are
    /// fetched afresh).
    requested: Url,
    /// The URL whose body is being read (after redirects).
    url: Url,
    requires_token: bool,
    gzip: bool,
    ranges: bool,
    /// Body bytes delivered so far (encoded).
    offset: u64,
    resumes: u32,
    state: State,
    /// The slot in the client's concurrency limit, held until the body is read (or dropped).
    _permit: Option<super::limiter::Permit>,
}

enum State {
    Reading(BoxStream<'static, reqwest::Result<Bytes>>),
    Resuming(BoxFuture<'static, Result<FileResponse, ClientError>>),
    Done,
}

impl std::fmt::Debug for Download {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Download")
            .field("url", &redact(&self.url))
            .field("gzip", &self.gzip)
            .field("ranges", &self.ranges)
            .field("offset", &self.offset)
            .field("resumes", &self.resumes)
            .finish_non_exhaustive()
    }
}

impl Download {
    fn new(
        client: BulkClient,
        requested: Url,
        requires_token: bool,
        mut first: FileResponse,
    ) -> Self {
        Download {
            _permit: first.permit.take(),
            client,
            requested,
            url: first.url,
            requires_token,
            gzip: first.gzip,
            ranges: first.ranges,
            offset: 0,
            resumes: 0,
            state: State::Reading(first.response.bytes_stream().boxed()),
        }
    }

    /// Whether the bytes are gzip-encoded (`Content-Encoding: gzip`).
    pub fn gzip(&self) -> bool {
        self.gzip
    }

    /// The URL finally read, after redirects (of the latest resume, if any).
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// How many times a cut body was resumed with `Range`.
    pub fn resumes(&self) -> u32 {
        self.resumes
    }

    /// Body bytes delivered so far, as sent (gzip-encoded when [`gzip`](Self::gzip)).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The error a cut or stalled body ends with when it is not resumed.
    fn cut_error(&self, e: reqwest::Error) -> ClientError {
        if e.is_timeout() {
            ClientError::Stalled {
                method: "GET",
                url: redact(&self.url),
                idle: self.client.idle_timeout(),
            }
        } else {
            ClientError::Network {
                method: "GET",
                url: redact(&self.url),
                source: e.without_url(),
            }
        }
    }

    /// After a cut: a `Range` request from the current offset, or `None` when this body cannot
    /// (gzip, no `Accept-Ranges: bytes`) or may not (no resumes left) be resumed.
    fn resume(&mut self, e: &reqwest::Error) -> Option<State> {
        let max = self.client.retry().max_retries;
        if self.gzip || !self.ranges || self.resumes >= max {
            return None;
        }
        self.resumes += 1;
        self.client.http_stats().retry();
        tracing::info!(
            url = %redact(&self.url),
            offset = self.offset,
            retry = self.resumes,
            of = max,
            stalled = e.is_timeout(),
            "Download cut; resuming with Range: retry {} of {max}.",
            self.resumes
        );
        let (client, url, token, from) = (
            self.client.clone(),
            self.requested.clone(),
            self.requires_token,
            self.offset,
        );
        Some(State::Resuming(Box::pin(async move {
            client.open_file_with(&url, token, from, true).await
        })))
    }
}

impl Stream for Download {
    type Item = Result<Bytes, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                State::Done => return Poll::Ready(None),
                State::Reading(body) => match ready!(body.poll_next_unpin(cx)) {
                    Some(Ok(chunk)) if chunk.is_empty() => {}
                    Some(Ok(chunk)) => {
                        this.offset += chunk.len() as u64;
                        this.client.http_stats().received(chunk.len() as u64);
                        return Poll::Ready(Some(Ok(chunk)));
                    }
                    None => {
                        this.state = State::Done;
                        return Poll::Ready(None);
                    }
                    Some(Err(e)) => match this.resume(&e) {
                        Some(next) => this.state = next,
                        None => {
                            this.state = State::Done;
                            return Poll::Ready(Some(Err(this.cut_error(e))));
                        }
                    },
                },
                State::Resuming(open) => {
                    let opened = ready!(open.as_mut().poll(cx));
                    let next = opened.and_then(|r| {
                        let wrong = if r.offset != this.offset {
                            "ignored the Range request"
                        } else if r.gzip {
                            "answered gzip-encoded where identity was asked for"
                        } else {
                            return Ok(r);
                        };
                        Err(ClientError::Protocol {
                            url: redact(&r.url),
                            message: format!(
                                "resuming a cut download from byte {}: the server {wrong}",
                                this.offset
                            ),
                        })
                    });
                    match next {
                        Ok(r) => {
                            this.url = r.url;
                            this.ranges = r.ranges;
                            this.state = State::Reading(r.response.bytes_stream().boxed());
                        }
                        Err(e) => {
                            this.state = State::Done;
                            return Poll::Ready(Some(Err(e)));
                        }
                    }
                }
            }
        }
    }
}

/// Where a redirect answered by `current` leads: its `Location` resolved against `current`,
/// when the hop is allowed — fewer than `max` hops so far, http(s), and not from https down to
/// http. Errors are [`ClientError::Protocol`] naming both URLs, redacted.
pub(super) fn redirect_target(
    current: &Url,
    status: StatusCode,
    location: Option<&HeaderValue>,
    hops: u32,
    max: u32,
) -> Result<Url, ClientError> {
    let refuse = |message: String| ClientError::Protocol {
        url: redact(current),
        message,
    };
    if hops >= max {
        return Err(refuse(format!(
            "{status} redirect refused: more than {max} redirects for one file"
        )));
    }
    let Some(location) = location else {
        return Err(refuse(format!(
            "{status} redirect without a Location header"
        )));
    };
    let Ok(location) = location.to_str() else {
        return Err(refuse(format!(
            "{status} redirect whose Location is not text"
        )));
    };
    let next = current.join(location.trim()).map_err(|e| {
        refuse(format!(
            "{status} redirect to {}, which does not parse ({e})",
            super::error::redact_raw(location)
        ))
    })?;
    match (current.scheme(), next.scheme()) {
        ("https", "http") => Err(refuse(format!(
            "{status} redirect refused: {} would downgrade https to http",
            redact(&next)
        ))),
        (_, "http" | "https") => Ok(next),
        (_, other) => Err(refuse(format!(
            "{status} redirect refused: {} has scheme {other:?} (only http and https)",
            redact(&next)
        ))),
    }
}

/// Whether a status is a redirect this client follows for file downloads.
pub(super) fn follows(status: StatusCode) -> bool {
    matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(current: &str, location: Option<&str>, hops: u32) -> Result<String, String> {
        let current = Url::parse(current).unwrap();
        let value = location.map(|l| HeaderValue::from_str(l).unwrap());
        redirect_target(
            &current,
            StatusCode::TEMPORARY_REDIRECT,
            value.as_ref(),
            hops,
            DEFAULT_MAX_REDIRECTS,
        )
        .map(String::from)
        .map_err(|e| e.to_string())
    }

    #[test]
    fn redirect_targets_resolve_relative_to_the_current_url() {
        assert_eq!(
            hop(
                "https://ehr/fhir/files/1.ndjson?a=1",
                Some("2.ndjson?b=2"),
                0
            )
            .unwrap(),
            "https://ehr/fhir/files/2.ndjson?b=2"
        );
        assert_eq!(
            hop("https://ehr/fhir/files/1.ndjson", Some("/s3/x"), 4).unwrap(),
            "https://ehr/s3/x"
        );
        assert_eq!(
            hop(
                "http://127.0.0.1:1/f",
                Some("https://bucket.s3/k?X-Amz-Signature=s"),
                0
            )
            .unwrap(),
            "https://bucket.s3/k?X-Amz-Signature=s"
        );
        assert_eq!(
            hop("https://ehr/f", Some("//cdn.example/k"), 0).unwrap(),
            "https://cdn.example/k"
        );
    }

    #[test]
    fn redirects_that_are_refused() {
        let e = hop(
            "https://ehr/f?sig=s3cr3t",
            Some("http://cdn/k?sig=other"),
            0,
        )
        .unwrap_err();
        assert!(
            e.contains("downgrade") && e.contains("http://cdn/k?…"),
            "{e}"
        );
        assert!(!e.contains("s3cr3t") && !e.contains("other"), "{e}");
        let e = hop("https://ehr/f", Some("file:///etc/passwd"), 0).unwrap_err();
        assert!(e.contains("\"file\""), "{e}");
        let e = hop("https://ehr/f", Some("https://ok/k"), DEFAULT_MAX_REDIRECTS).unwrap_err();
        assert!(e.contains("more than 5 redirects"), "{e}");
        let e = hop("https://ehr/f", None, 0).unwrap_err();
        assert!(e.contains("without a Location"), "{e}");
        let e = hop("https://ehr/f", Some("https://bad host/k?sig=1"), 0).unwrap_err();
        assert!(e.contains("does not parse") && !e.contains("sig=1"), "{e}");
        assert!(follows(StatusCode::FOUND) && follows(StatusCode::PERMANENT_REDIRECT));
        assert!(!follows(StatusCode::NOT_MODIFIED) && !follows(StatusCode::MULTIPLE_CHOICES));
    }
}
