//! Download progress on the terminal for the command-line tools: a progress bar over all files
//! when stderr is a terminal, plain lines (one per file, and every 10%) when it is not (CI
//! logs, pipes).

use std::io::IsTerminal;
use std::sync::Mutex;

use anyhow::Result;
use gstllamavid::hub::{human_bytes, FetchEvent, FetchObserver, FetchedModel, Hub, ModelRequest};
use gstllamavid::model::WeightFormat;
use indicatif::{ProgressBar, ProgressStyle};

enum Display {
    Bar(ProgressBar),
    Lines { last_tenth: u64 },
}

/// A [`FetchObserver`] that draws on stderr.
pub struct TerminalProgress {
    display: Mutex<Option<Display>>,
}

impl Default for TerminalProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl TerminalProgress {
    pub fn new() -> Self {
        Self {
            display: Mutex::new(None),
        }
    }

    fn short(file: &str) -> &str {
        file.rsplit([' ', '/']).next().unwrap_or(file)
    }

    /// Ends the bar (leaving its last state on screen).
    pub fn finish(&self) {
        if let Some(Display::Bar(bar)) = self
            .display
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            bar.finish();
        }
    }
}

impl FetchObserver for TerminalProgress {
    fn event(&self, event: &FetchEvent<'_>) {
        let mut display = self.display.lock().unwrap_or_else(|e| e.into_inner());
        match *event {
            FetchEvent::Plan { files, bytes } => {
                eprintln!("Downloading {files} file(s), {}", human_bytes(bytes));
                *display = Some(if std::io::stderr().is_terminal() {
                    let bar = ProgressBar::new(bytes);
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{msg:32!} [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                        )
                        .expect("valid template")
                        .progress_chars("=> "),
                    );
                    Display::Bar(bar)
                } else {
                    Display::Lines { last_tenth: 0 }
                });
            }
            FetchEvent::Bytes {
                file,
                overall_done,
                overall_total,
                ..
            } => match display.as_mut() {
                Some(Display::Bar(bar)) => {
                    bar.set_message(Self::short(file).to_owned());
                    bar.set_position(overall_done);
                }
                Some(Display::Lines { last_tenth }) if overall_total > 0 => {
                    let tenth = overall_done * 10 / overall_total;
                    if tenth > *last_tenth {
                        *last_tenth = tenth;
                        eprintln!(
                            "  {:3}% of {} ({})",
                            tenth * 10,
                            human_bytes(overall_total),
                            Self::short(file)
                        );
                    }
                }
                _ => {}
            },
            FetchEvent::Done { file, bytes } => {
                let line = format!("fetched {file} ({})", human_bytes(bytes));
                match display.as_ref() {
                    Some(Display::Bar(bar)) => bar.println(line),
                    _ => eprintln!("{line}"),
                }
            }
            FetchEvent::Note(note) => match display.as_ref() {
                Some(Display::Bar(bar)) => bar.println(note),
                _ => eprintln!("note: {note}"),
            },
        }
    }
}

/// Fetches `model` (a directory or a hub id) and `vision_tower` as the element would, with the
/// standard hub environment variables, drawing progress on stderr.
pub fn fetch_model(
    model: &str,
    vision_tower: Option<&str>,
    weights: WeightFormat,
) -> Result<FetchedModel> {
    let mut request = ModelRequest::parse(model, vision_tower)?;
    request.weights = weights;
    let hub = Hub::from_env()?;
    let progress = TerminalProgress::new();
    let fetched = hub.fetch_model(&request, &progress);
    progress.finish();
    Ok(fetched?)
}
