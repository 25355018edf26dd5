//! The `flatfhir` binary: parse the command line, set up logging, run, map the outcome to an
//! exit code (0 success; 1 finished but rejects exceeded `--max-rejects`; 2 error; 3 the same
//! export is already running in another process, nothing done).

use std::process::ExitCode;

mod cli;

/// jemalloc rather than the system allocator: with glibc's, peak RSS grew with input size
/// (~250 MB at synthea-100 ×10, ~370 MB at ×100) as its dynamic mmap threshold moved large
/// batch buffers onto a fragmenting heap; jemalloc returns freed pages and keeps it flat.
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let (args, matches) = cli::Cli::parse_with_matches();
    cli::logging::init(args.verbose, args.quiet, args.log_format);
    match cli::run(args, &matches) {
        Ok(outcome) => outcome.exit_code(),
        Err(e) => {
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            let mut text = error_chain(&e);
            if let Some(hint) = hint_for(&text) {
                text.push_str(" (");
                text.push_str(hint);
                text.push(')');
            }
            cli::logging::say(tracing::Level::ERROR, &text);
            ExitCode::from(cli::exit_code_of(&e))
        }
    }
}

/// What to do about an error whose text alone does not say it.
fn hint_for(error: &str) -> Option<&'static str> {
    // object_store fell back to the EC2 instance metadata endpoint: no credentials anywhere.
    error.contains("169.254.169.254").then_some(
        "no AWS credentials were found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \
         (or --store-option aws_access_key_id=… aws_secret_access_key=…), or run where an \
         instance role is available",
    )
}

/// The error and its causes on one line, each said once: a cause whose text the message so far
/// already holds (an error that prints its source, a wrapper that repeats it) is left out.
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        let text = text.trim();
        if text.is_empty() || out.contains(text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(text);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn missing_aws_credentials_get_a_hint() {
        let e = "accessing x in the object store: Generic S3 error: Error performing PUT \
                 http://169.254.169.254/latest/api/token in 1ms - 403 Forbidden";
        assert!(super::hint_for(e).unwrap().contains("AWS_ACCESS_KEY_ID"));
        assert!(super::hint_for("a local error").is_none());
    }
}
