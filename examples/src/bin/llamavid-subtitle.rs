//! A video file in, a Matroska file out with the captions as a subtitle track, and a WebVTT
//! file beside it:
//!
//! ```text
//! llamavid-subtitle --model DIR INPUT OUTPUT.mkv [--vtt FILE] [--encoder FRAGMENT]
//!                   [--prompt Q] [--set PROPERTY=VALUE]...
//! ```
//! The video is decoded, captioned by `llamavidcaption` (a file is not live, so every sampled
//! frame is encoded and every caption made) and encoded again (`--encoder`, by default
//! `x264enc speed-preset=veryfast ! h264parse`: H.264) into `OUTPUT.mkv`; the caption text
//! stream is the file's subtitle track (`matroskamux`'s `subtitle_%u`, S_TEXT/UTF8). Only the
//! first video stream is kept (no audio). The WebVTT file (by default OUTPUT with `.vtt`) is
//! written here from the same text stream, not by GStreamer's `webvttenc`: in GStreamer 1.22
//! that element copies the text into the cue as it is, so a caption holding `<`, `&` or a blank
//! line would end up as a tag, a broken entity or a cut cue; here those are escaped and blank
//! lines dropped. Each caption is printed as `START --> END "TEXT"` (times as in the files,
//! text as a JSON string).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use gst::prelude::*;
use llamavid_examples::pipeline::{
    element, init, launch, option_value, run_bus, source_fragment, CaptionSettings,
};

const USAGE: &str = "usage: llamavid-subtitle --model DIR INPUT OUTPUT.mkv [--vtt FILE] \
[--encoder FRAGMENT] [--prompt Q] [--set PROPERTY=VALUE]...";

const DEFAULT_ENCODER: &str = "x264enc speed-preset=veryfast ! h264parse";

struct Args {
    caption: CaptionSettings,
    input: PathBuf,
    output: PathBuf,
    vtt: PathBuf,
    encoder: String,
}

fn parse_args() -> Result<Args> {
    let mut args = std::env::args().skip(1);
    let mut caption = CaptionSettings::default();
    let mut positional = Vec::new();
    let mut vtt = None;
    let mut encoder = DEFAULT_ENCODER.to_owned();
    while let Some(arg) = args.next() {
        if caption.take_option(&arg, &mut args, USAGE)? {
            continue;
        }
        match arg.as_str() {
            "--vtt" => vtt = Some(PathBuf::from(option_value(&arg, &mut args, USAGE)?)),
            "--encoder" => encoder = option_value(&arg, &mut args, USAGE)?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other if other.starts_with("--") => bail!("unknown option {other}\n{USAGE}"),
            _ => positional.push(PathBuf::from(arg)),
        }
    }
    caption.check(USAGE)?;
    let [input, output]: [PathBuf; 2] = positional
        .try_into()
        .map_err(|_| anyhow::anyhow!("expected INPUT and OUTPUT.mkv\n{USAGE}"))?;
    if !input.is_file() {
        bail!("{}: no such file", input.display());
    }
    let vtt = vtt.unwrap_or_else(|| output.with_extension("vtt"));
    if vtt == output {
        bail!("the WebVTT file would overwrite {}", output.display());
    }
    Ok(Args {
        caption,
        input,
        output,
        vtt,
        encoder,
    })
}

/// A WebVTT timestamp, `HH:MM:SS.mmm`.
fn vtt_time(ns: u64) -> String {
    let ms = ns / 1_000_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

/// A caption as WebVTT cue text: `&`, `<` and `>` as character references (so the text can
/// be neither a tag nor `-->`), one line per non-blank line (a blank line would end the cue).
/// None when nothing visible is left.
fn vtt_cue_text(text: &str) -> Option<String> {
    let lines: Vec<String> = text
        .split(['\n', '\r'])
        .map(str::trim_end)
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            line.replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
        })
        .collect();
    (!lines.is_empty()).then(|| lines.join("\n"))
}

/// Writes the WebVTT file cue by cue, flushed after each (the file is usable while the video is
/// still being captioned).
struct VttWriter {
    file: std::io::BufWriter<std::fs::File>,
    cues: usize,
}

impl VttWriter {
    fn create(path: &Path) -> Result<Self> {
        let file = std::fs::File::create(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let mut writer = VttWriter {
            file: std::io::BufWriter::new(file),
            cues: 0,
        };
        writer.file.write_all(b"WEBVTT\n\n")?;
        writer.file.flush()?;
        Ok(writer)
    }

    fn cue(&mut self, start: u64, end: u64, text: &str) -> std::io::Result<()> {
        let Some(text) = vtt_cue_text(text) else {
            return Ok(());
        };
        self.cues += 1;
        // A cue must end after it starts.
        let end = end.max(start + 1_000_000);
        write!(
            self.file,
            "{}\n{} --> {}\n{text}\n\n",
            self.cues,
            vtt_time(start),
            vtt_time(end)
        )?;
        self.file.flush()
    }
}

fn main() {
    llamavid_examples::exit_on_error(run());
}

fn run() -> Result<()> {
    let args = parse_args()?;
    init()?;

    // The text queues are unbounded (captions are a few bytes): a full one would hold the
    // element while the muxer waits for video frames still inside the encoder.
    let description = format!(
        "{source} ! llamavidcaption name=captioner ! videoconvert ! {encoder} ! queue ! \
         matroskamux name=mux ! filesink name=file \
         captioner.text_src ! tee name=text \
         text. ! queue max-size-buffers=0 max-size-time=0 max-size-bytes=0 ! mux.subtitle_%u \
         text. ! queue max-size-buffers=0 max-size-time=0 max-size-bytes=0 ! \
         fakesink name=cues sync=false",
        source = source_fragment(&args.input.to_string_lossy())?,
        encoder = args.encoder,
    );
    let pipeline = launch(&description)?;
    args.caption.apply(&element(&pipeline, "captioner")?)?;
    element(&pipeline, "file")?.set_property("location", args.output.to_string_lossy().as_ref());

    let vtt = Arc::new(Mutex::new(VttWriter::create(&args.vtt)?));
    let write_error: Arc<Mutex<Option<std::io::Error>>> = Arc::default();
    // The cues are read off the text sink's pad, before the sink clips to the segment: the
    // final caption (made at EOS) starts where the previous one ends, which may be past the end
    // of the video, and matroskamux keeps it too.
    let cue_pad = element(&pipeline, "cues")?
        .static_pad("sink")
        .context("the cue sink has no pad")?;
    let (writer, failed) = (vtt.clone(), write_error.clone());
    cue_pad.add_probe(gst::PadProbeType::BUFFER, move |pad, info| {
        let Some(buffer) = info.buffer() else {
            return gst::PadProbeReturn::Ok;
        };
        let segment = pad
            .sticky_event::<gst::event::Segment>(0)
            .and_then(|e| e.segment().downcast_ref::<gst::ClockTime>().cloned());
        // Running time, as matroskamux times the subtitle track (also past the segment's stop).
        let running = |t: gst::ClockTime| {
            segment
                .as_ref()
                .and_then(|s| s.to_running_time_full(t))
                .and_then(|rt| rt.positive())
        };
        let Some(start) = buffer.pts().and_then(running) else {
            return gst::PadProbeReturn::Ok;
        };
        let end = buffer
            .pts()
            .zip(buffer.duration())
            .and_then(|(pts, duration)| running(pts + duration))
            .unwrap_or(start);
        let text = buffer
            .map_readable()
            .map(|m| String::from_utf8_lossy(&m).into_owned())
            .unwrap_or_default();
        println!(
            "{} --> {} {}",
            vtt_time(start.nseconds()),
            vtt_time(end.nseconds()),
            serde_json::Value::from(text.as_str())
        );
        let mut writer = writer.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = writer.cue(start.nseconds(), end.nseconds(), &text) {
            *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
            // No more cues; the error is reported once the pipeline is done.
            return gst::PadProbeReturn::Remove;
        }
        gst::PadProbeReturn::Ok
    });

    pipeline.set_state(gst::State::Playing)?;
    let result = run_bus(&pipeline, |_, _| Ok(()));
    pipeline.set_state(gst::State::Null)?;
    if let Some(e) = write_error.lock().unwrap_or_else(|e| e.into_inner()).take() {
        bail!("writing {}: {e}", args.vtt.display());
    }
    result?;
    let cues = vtt.lock().unwrap_or_else(|e| e.into_inner()).cues;
    eprintln!(
        "wrote {} (video and subtitle track) and {} ({cues} cues)",
        args.output.display(),
        args.vtt.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webvtt_times_and_escaping() {
        assert_eq!(vtt_time(0), "00:00:00.000");
        assert_eq!(vtt_time(3_723_456_000_000), "01:02:03.456");
        assert_eq!(
            vtt_cue_text("a <b> & c --> d").unwrap(),
            "a &lt;b&gt; &amp; c --&gt; d"
        );
        assert_eq!(vtt_cue_text("two\n\n lines \r\n").unwrap(), "two\n lines");
        assert_eq!(vtt_cue_text(" \n\t"), None);
    }
}
