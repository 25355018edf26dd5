//! Logging: tracing to stderr, level from `-v`/`-q` counts unless `RUST_LOG` is set; plain text
//! (the default) or one JSON object per line (`--log-format json`) for schedulers and log
//! shippers that index fields rather than read sentences.
//!
//! A JSON line holds `time` (RFC 3339, UTC), `level`, `target`, `run_id` (from the `run` span
//! a run's events are in, once the run id is known), `message`, and `fields`: the event's own
//! fields and those of the spans it is in (the innermost wins). Every value is what the text
//! format would print — the same events, the same redactions (tokens and keys never reach an
//! event; the client marks its Authorization header sensitive) — and no value is longer than
//! [`MAX_VALUE_CHARS`].
//!
//! Lines that the CLI writes to stderr itself (the final `error: …`, a notice that an
//! unfinished job is continued) go through [`say`], so with `json` they are JSON objects too:
//! every line of stderr parses.

use std::{
    io::Write,
    sync::{Mutex, OnceLock},
};

use serde_json::{Map, Value};
use tracing::{
    Event, Level, Subscriber,
    field::{Field, Visit},
    span,
};
use tracing_subscriber::{
    EnvFilter, Layer, fmt::MakeWriter, layer::Context, prelude::*, registry::LookupSpan,
};

/// Longest value (in characters) a JSON log line carries; longer ones are cut with `…`.
pub const MAX_VALUE_CHARS: usize = 4096;

/// How log lines look.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (colours on a terminal).
    #[default]
    Text,
    /// One JSON object per line: time, level, target, run_id, message, fields.
    Json,
}

static FORMAT: OnceLock<LogFormat> = OnceLock::new();

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

/// Install the global subscriber on stderr: text (no ANSI colours when stderr is not a
/// terminal) or JSON lines.
pub fn init(verbose: u8, quiet: u8, format: LogFormat) {
    let _ = FORMAT.set(format);
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(filter_for(verbose, quiet)));
    match format {
        LogFormat::Text => {
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .with_ansi(ansi)
                .with_target(false)
                .try_init();
        }
        LogFormat::Json => {
            let _ = tracing_subscriber::registry()
                .with(filter)
                .with(JsonLayer::new(std::io::stderr))
                .try_init();
        }
    }
}

/// The format chosen at [`init`].
pub fn format() -> LogFormat {
    FORMAT.get().copied().unwrap_or_default()
}

/// A line the CLI says on stderr whatever the verbosity: `error: …`, `warning: …` or
/// `flatfhir: …` as text, a JSON object (`level`, `message`) with `--log-format json`.
pub fn say(level: Level, message: &str) {
    match format() {
        LogFormat::Text => {
            let prefix = match level {
                Level::ERROR => "error",
                Level::WARN => "warning",
                _ => "flatfhir",
            };
            eprintln!("{prefix}: {message}");
        }
        LogFormat::Json => {
            let line = json_line(level, "flatfhir", None, message, Map::new());
            let _ = std::io::stderr().lock().write_all(&line);
        }
    }
}

/// One JSON log line, newline included; keys in a fixed order (time, level, target, run_id,
/// message, fields) so the lines also read well by eye.
fn json_line(
    level: Level,
    target: &str,
    run_id: Option<Value>,
    message: &str,
    fields: Map<String, Value>,
) -> Vec<u8> {
    let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let mut parts: Vec<(&str, Value)> = vec![
        ("time", time.into()),
        ("level", level.as_str().into()),
        ("target", target.into()),
    ];
    if let Some(run) = run_id {
        parts.push(("run_id", run));
    }
    parts.push(("message", bounded(message.to_string())));
    if !fields.is_empty() {
        parts.push(("fields", Value::Object(fields)));
    }
    let mut line = b"{".to_vec();
    for (i, (k, v)) in parts.iter().enumerate() {
        if i > 0 {
            line.push(b',');
        }
        line.extend(format!("\"{k}\":").bytes());
        // Serialising a `Value` cannot fail.
        line.extend(serde_json::to_vec(v).unwrap_or_default());
    }
    line.extend(b"}\n");
    line
}

fn bounded(mut s: String) -> Value {
    if let Some((cut, _)) = s.char_indices().nth(MAX_VALUE_CHARS) {
        s.truncate(cut);
        s.push('…');
    }
    Value::String(s)
}

/// The fields of an event or span, as JSON values (`message` apart).
#[derive(Debug, Default)]
struct Fields {
    map: Map<String, Value>,
    message: Option<String>,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.message = Some(text);
        } else {
            self.map.insert(field.name().into(), bounded(text));
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = Some(value.to_string());
        } else {
            self.map.insert(field.name().into(), bounded(value.into()));
        }
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.record_str(field, &value.to_string());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.map.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.map.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.map.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.map.insert(field.name().into(), value.into());
    }
}

/// A [`Layer`] writing each event as one JSON line (see the [module docs](self)).
pub struct JsonLayer<W> {
    make_writer: W,
    /// One line at a time, so lines of concurrent events never interleave.
    lock: Mutex<()>,
}

impl<W> JsonLayer<W> {
    /// Lines go to the writers `make_writer` makes (stderr in the binary).
    pub fn new(make_writer: W) -> Self {
        JsonLayer {
            make_writer,
            lock: Mutex::new(()),
        }
    }
}

impl<S, W> Layer<S> for JsonLayer<W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'a> MakeWriter<'a> + 'static,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id)
            && let Some(fields) = span.extensions_mut().get_mut::<Fields>()
        {
            values.record(fields);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut merged = Map::new();
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(f) = span.extensions().get::<Fields>() {
                    merged.extend(f.map.clone());
                }
            }
        }
        let mut own = Fields::default();
        event.record(&mut own);
        merged.extend(own.map);
        // Events bridged from the `log` crate carry their origin as `log.*` fields.
        let meta = event.metadata();
        let target = match merged.get("log.target") {
            Some(Value::String(t)) => t.clone(),
            _ => meta.target().to_string(),
        };
        merged.retain(|k, _| !k.starts_with("log."));
        let run_id = merged.remove("run_id");
        let line = json_line(
            *meta.level(),
            &target,
            run_id,
            own.message.as_deref().unwrap_or(""),
            merged,
        );
        let _one_at_a_time = self.lock.lock();
        let _ = self.make_writer.make_writer().write_all(&line);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Buffer {
            self.clone()
        }
    }

    #[test]
    fn json_lines_carry_time_level_run_id_message_and_fields() {
        let buf = Buffer::default();
        let subscriber = tracing_subscriber::registry().with(JsonLayer::new(buf.clone()));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(files = 3, "before the run");
            let run = tracing::info_span!("run", run_id = "r-1");
            let _g = run.enter();
            let file = tracing::debug_span!("download", url = "http://h/1.ndjson");
            let _f = file.enter();
            tracing::warn!(retry = 1, ok = false, "retry {} of {}", 1, 6);
            tracing::info!(long = "x".repeat(MAX_VALUE_CHARS + 10), "long");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(text.starts_with("{\"time\":"), "{text}");
        assert_eq!(lines[0]["message"], "before the run");
        assert_eq!(lines[0]["fields"]["files"], 3);
        assert!(lines[0].get("run_id").is_none());
        let w = &lines[1];
        assert_eq!(w["level"], "WARN");
        assert_eq!(w["run_id"], "r-1");
        assert_eq!(w["message"], "retry 1 of 6");
        assert_eq!(w["fields"]["retry"], 1);
        assert_eq!(w["fields"]["ok"], false);
        assert_eq!(w["fields"]["url"], "http://h/1.ndjson");
        assert!(
            chrono::DateTime::parse_from_rfc3339(w["time"].as_str().unwrap()).is_ok(),
            "{w}"
        );
        let long = lines[2]["fields"]["long"].as_str().unwrap();
        assert_eq!(long.chars().count(), MAX_VALUE_CHARS + 1);
        assert!(long.ends_with('…'));
    }
}
