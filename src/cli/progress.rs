//! Progress on stderr: an indicatif bar fed from the pipeline's atomic counters by a ticker
//! thread. Hidden when stderr is not a terminal or with `-q`.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use flatfhir::run::Progress;

/// A running progress display; [`stop`](Self::stop) clears it.
pub struct ProgressDisplay {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl ProgressDisplay {
    /// Show progress of `total_bytes` input bytes.
    pub fn start(
        progress: Arc<Progress>,
        total_bytes: u64,
        total_files: u64,
        hidden: bool,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let target = if hidden {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        let bar = ProgressBar::with_draw_target(Some(total_bytes), target);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {bytes}/{total_bytes} ({bytes_per_sec}) {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                bar.set_position(progress.bytes.load(Ordering::Relaxed));
                let total = match progress.files_total.load(Ordering::Relaxed) {
                    0 => total_files,
                    n => n,
                };
                let state = progress.state();
                let rows = progress.rows_summary(3);
                bar.set_message(format!(
                    "{}{}/{total} files, {} lines, {} rejects{}",
                    if state.is_empty() {
                        String::new()
                    } else {
                        format!("{state} · ")
                    },
                    progress.files.load(Ordering::Relaxed),
                    progress.lines.load(Ordering::Relaxed),
                    progress.rejects.load(Ordering::Relaxed),
                    if rows.is_empty() {
                        String::new()
                    } else {
                        format!(" · {rows}")
                    }
                ));
                std::thread::sleep(Duration::from_millis(100));
            }
            bar.finish_and_clear();
        });
        ProgressDisplay {
            stop,
            handle: Some(handle),
        }
    }

    /// Stop and clear the display.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
