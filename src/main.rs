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
            cli::logging::say(tracing::Level::ERROR, &error_chain(&e));
            ExitCode::from(cli::exit_code_of(&e))
        }
    }
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
