//! Logging: tracing to stderr, level from `-v`/`-q` counts unless `RUST_LOG` is set.

use tracing_subscriber::EnvFilter;

/// The filter for a verbosity (`-v` count minus `-q` count). delta-rs logs every error it returns
/// (a lost commit race it retries included); flatfhir reports the errors that matter once, so
/// below `-vv` delta-rs's own events are off.
pub fn filter_for(verbose: u8, quiet: u8) -> &'static str {
    match verbose as i16 - quiet as i16 {
        i16::MIN..=-2 => "off",
        -1 => "error,deltalake_core=off,buoyant_kernel=off,buoyant_kernel_engine=off",
        0 => "warn,flatfhir=info,deltalake_core=off,buoyant_kernel=off,buoyant_kernel_engine=off",
        1 => "info,flatfhir=debug,deltalake_core=off,buoyant_kernel=off,buoyant_kernel_engine=off",
        // Other crates stay at debug (DataFusion's trace events print data values), delta-rs at
        // info (its debug events print the commits' statistics: data values).
        _ => {
            "debug,flatfhir=trace,deltalake_core=info,buoyant_kernel=info,buoyant_kernel_engine=info"
        }
    }
}

/// Install the global subscriber (stderr, no ANSI colours when stderr is not a terminal).
pub fn init(verbose: u8, quiet: u8) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(filter_for(verbose, quiet)));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .try_init();
}
