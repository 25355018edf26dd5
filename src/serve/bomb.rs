//! The `gzip-bomb` fault's file: one valid Patient line repeated until the plain body reaches a
//! requested size, served gzip-encoded at deflate's best level (about 290:1, so 300 MiB travel
//! as about 1 MiB), so that a client's memory can be tested against a body that is small on the
//! wire and huge once inflated.
//!
//! The plain body is never held in memory: the gzip body is compressed once, from generated
//! chunks, when the job is built, and identity (or `Range`) requests are answered from a
//! generator.

use std::io::Write;

use bytes::Bytes;

/// The repeated line (without its newline): a valid, minimal Patient.
pub(super) const BOMB_LINE: &[u8] =
    br#"{"resourceType":"Patient","id":"gzip-bomb","gender":"unknown","birthDate":"1970-01-01"}"#;

/// Default plain size of the bomb with `gzip-bomb` and no size: 300 MiB.
pub(super) const DEFAULT_BOMB_BYTES: u64 = 300 << 20;

/// Plain bytes generated per chunk (whole lines).
const CHUNK_LINES: u64 = 1024;

/// A file of [`BOMB_LINE`] repeated `lines` times, plus its gzip encoding.
#[derive(Debug)]
pub(super) struct GzipBomb {
    /// Lines in the plain body.
    pub lines: u64,
    /// The whole body, gzip-encoded (one gzip member).
    pub gzip: Bytes,
}

impl GzipBomb {
    /// A bomb of about `plain_bytes` (rounded down to whole lines, at least one line).
    /// CPU-bound (compresses the whole plain body): call it off the I/O runtime.
    pub fn new(plain_bytes: u64) -> Self {
        let lines = (plain_bytes / line_len()).max(1);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let mut done = 0;
        while done < lines {
            let n = CHUNK_LINES.min(lines - done);
            // Writing into a Vec cannot fail.
            let _ = gz.write_all(&plain_chunk(n));
            done += n;
        }
        GzipBomb {
            lines,
            gzip: Bytes::from(gz.finish().unwrap_or_default()),
        }
    }

    /// Length of the plain body.
    pub fn plain_len(&self) -> u64 {
        self.lines * line_len()
    }

    /// The plain bytes `start..end` as a stream of chunks (of at most [`CHUNK_LINES`] lines).
    pub fn plain(
        &self,
        start: u64,
        end: u64,
    ) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
        let end = end.min(self.plain_len());
        let chunk = Bytes::from(plain_chunk(CHUNK_LINES));
        futures::stream::unfold(start, move |pos| {
            let chunk = chunk.clone();
            async move {
                if pos >= end {
                    return None;
                }
                // Chunks start on line boundaries of the generator, so slice from `pos` within
                // a whole-lines chunk.
                let within = (pos % chunk.len() as u64) as usize;
                let take = (chunk.len() - within).min((end - pos) as usize);
                Some((Ok(chunk.slice(within..within + take)), pos + take as u64))
            }
        })
    }
}

fn line_len() -> u64 {
    BOMB_LINE.len() as u64 + 1
}

fn plain_chunk(lines: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(lines as usize * BOMB_LINE.len() + lines as usize);
    for _ in 0..lines {
        out.extend_from_slice(BOMB_LINE);
        out.push(b'\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use futures::TryStreamExt;

    use super::*;

    #[test]
    fn the_bomb_inflates_to_what_it_promises() {
        let plain = 4 << 20;
        let bomb = GzipBomb::new(plain);
        assert_eq!(bomb.lines, plain / line_len());
        assert!(bomb.plain_len() <= plain && bomb.plain_len() > plain - line_len());
        // Small on the wire: about 290:1 for a repeated line at the best level.
        assert!(
            (bomb.gzip.len() as u64) * 200 < bomb.plain_len(),
            "{} gzip bytes for {} plain",
            bomb.gzip.len(),
            bomb.plain_len()
        );
        let mut inflated = Vec::new();
        flate2::read::GzDecoder::new(&bomb.gzip[..])
            .read_to_end(&mut inflated)
            .unwrap();
        assert_eq!(inflated.len() as u64, bomb.plain_len());
        let mut n = 0;
        for line in inflated.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            assert_eq!(line, BOMB_LINE);
            n += 1;
        }
        assert_eq!(n, bomb.lines);
        let v: serde_json::Value = serde_json::from_slice(BOMB_LINE).unwrap();
        assert_eq!(v["resourceType"], "Patient");
        // Tiny sizes still give one whole line.
        assert_eq!(GzipBomb::new(1).lines, 1);
    }

    #[tokio::test]
    async fn plain_ranges_match_the_inflated_body() {
        let bomb = GzipBomb::new(300_000);
        let mut inflated = Vec::new();
        flate2::read::GzDecoder::new(&bomb.gzip[..])
            .read_to_end(&mut inflated)
            .unwrap();
        let len = bomb.plain_len();
        for (start, end) in [(0, len), (1, len), (12_345, 200_001), (len - 3, len)] {
            let got: Vec<Bytes> = bomb.plain(start, end).try_collect().await.unwrap();
            assert_eq!(
                got.concat(),
                &inflated[start as usize..end as usize],
                "{start}..{end}"
            );
        }
    }
}
