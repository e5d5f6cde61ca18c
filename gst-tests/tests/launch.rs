//! The plugin as users meet it: loaded from `libgstllamavid.so` by the command-line tools, and
//! composed with stock elements (textoverlay, x264enc, matroskamux). Each tool run is killed
//! after [`TOOL_TIMEOUT`], so a deadlock fails the test instead of hanging it.

use std::time::Duration;

use gst::prelude::*;
use llamavid_gst_tests::*;

const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// `model=<fixture> device=cpu sample-interval=100 caption-interval=500 max-new-tokens=4`,
/// as gst-launch arguments (the model path as one argument, whatever it contains).
fn caption_args(name: &str) -> Vec<String> {
    vec![
        "llamavidcaption".into(),
        format!("name={name}"),
        format!("model={}", model_dir().display()),
        "device=cpu".into(),
        "sample-interval=100".into(),
        "caption-interval=500".into(),
        "max-new-tokens=4".into(),
    ]
}

/// Runs `gst-launch-1.0 -m` with `args` (already split), asserting it succeeds.
fn launch(args: &[String]) -> ToolOutput {
    let mut all: Vec<&str> = vec!["-m"];
    all.extend(args.iter().map(String::as_str));
    let output = gst_tool("gst-launch-1.0", &all, TOOL_TIMEOUT);
    assert!(output.success, "gst-launch-1.0 failed:\n{}", output.all());
    // No error, and no GLib criticals (a refcount or state slip in the element shows as one).
    assert!(
        !output.all().lines().any(|l| l.starts_with("ERROR")),
        "{}",
        output.all()
    );
    assert!(!output.stderr.contains("CRITICAL"), "{}", output.stderr);
    output
}

fn split(description: &str) -> Vec<String> {
    description.split_whitespace().map(String::from).collect()
}

/// The caption messages in gst-launch's `-m` output.
fn caption_lines(output: &ToolOutput) -> Vec<&str> {
    output
        .stdout
        .lines()
        .filter(|l| l.contains(&format!("(element): {CAPTION_MESSAGE}, ")))
        .collect()
}

#[test]
fn gst_inspect_finds_the_element_and_lists_its_properties_and_pads() {
    let output = gst_tool("gst-inspect-1.0", &["llamavidcaption"], TOOL_TIMEOUT);
    assert!(output.success, "{}", output.all());
    let text = &output.stdout;
    for expected in [
        "llamavidcaption",
        "Filter/Analyzer/Video",
        "SINK template: 'sink'",
        "SRC template: 'src'",
        "SRC template: 'text_src'",
        "pango-markup",
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} missing from:\n{text}"
        );
    }
    for property in [
        "model",
        "vision-tower",
        "prompt",
        "device",
        "sample-interval",
        "window-duration",
        "caption-interval",
        "max-new-tokens",
        "temperature",
        "top-p",
        "seed",
        "latency",
        "frame-policy",
        "frames-sampled",
        "frames-encoded",
        "frames-dropped",
        "captions",
        "last-caption",
        "last-caption-latency",
    ] {
        assert!(
            // "  name   : blurb", or "  long-name: blurb".
            text.lines().any(|l| l
                .trim_start()
                .strip_prefix(property)
                .is_some_and(|rest| rest.trim_start().starts_with(':'))),
            "property {property} missing from:\n{text}"
        );
    }
    // And the plugin itself, loaded from this build (the tests' plugin directory).
    let plugin = gst_tool("gst-inspect-1.0", &["llamavid"], TOOL_TIMEOUT);
    assert!(
        plugin.success && plugin.stdout.contains("llamavidcaption"),
        "{}",
        plugin.all()
    );
    let filename = plugin
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("Filename"))
        .unwrap_or_else(|| panic!("no Filename in:\n{}", plugin.stdout));
    assert!(filename.contains("llamavid-gst-plugin"), "{filename}");
}

#[test]
fn gst_launch_with_textoverlay_reaches_eos_and_posts_captions() {
    // textoverlay waits for text to cover each video frame: the element's GAPs and captions
    // must keep it going, or this deadlocks (and is killed).
    let mut args =
        split("videotestsrc num-buffers=20 ! video/x-raw,width=160,height=120,framerate=10/1 !");
    args.extend(caption_args("c"));
    args.extend(split(
        "! textoverlay name=o ! fakesink c.text_src ! o.text_sink",
    ));
    let output = launch(&args);
    assert!(
        output.stdout.contains("Got EOS from element"),
        "{}",
        output.all()
    );
    let captions = caption_lines(&output);
    // 2 s of video: captions at 0.5, 1 and 1.5 s, and a final one for the frames after.
    assert_eq!(captions.len(), 4, "{}", output.stdout);
    for line in captions {
        for field in [
            "text=(string)",
            "start=(guint64)",
            "end=(guint64)",
            "pts=(guint64)",
            "frames=(uint)",
            "latency=(guint64)",
            "prompt=(string)",
        ] {
            assert!(line.contains(field), "{field} missing from {line}");
        }
    }
}

/// Counts the buffers of each stream of a Matroska file, by type ("video", "subtitle"), with
/// the caps of the subtitle stream.
fn demux_counts(path: &std::path::Path) -> (usize, usize, Option<gst::Caps>) {
    init();
    let pipeline = gst::Pipeline::new();
    let src = gst::ElementFactory::make("filesrc")
        .property("location", path.to_str().unwrap())
        .build()
        .unwrap();
    let demux = gst::ElementFactory::make("matroskademux").build().unwrap();
    pipeline.add_many([&src, &demux]).unwrap();
    src.link(&demux).unwrap();
    let counts = std::sync::Arc::new(std::sync::Mutex::new((0usize, 0usize, None)));
    let (bin, c) = (pipeline.clone(), counts.clone());
    demux.connect_pad_added(move |_, pad| {
        let sink = gst::ElementFactory::make("fakesink")
            .property("sync", false)
            .build()
            .unwrap();
        bin.add(&sink).unwrap();
        sink.sync_state_with_parent().unwrap();
        pad.link(&sink.static_pad("sink").unwrap()).unwrap();
        let subtitle = pad.name().starts_with("subtitle");
        let c = c.clone();
        pad.add_probe(gst::PadProbeType::BUFFER, move |pad, _| {
            let mut c = c.lock().unwrap();
            if subtitle {
                c.1 += 1;
                c.2 = pad.current_caps();
            } else {
                c.0 += 1;
            }
            gst::PadProbeReturn::Ok
        });
    });
    run_to_eos(&pipeline, TIMEOUT);
    let c = counts.lock().unwrap();
    (c.0, c.1, c.2.clone())
}

#[test]
fn gst_launch_muxes_captions_as_a_matroska_subtitle_track() {
    // matroskamux takes text/x-raw,format=utf8 on its subtitle_%u request pads.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("captioned.mkv");
    let mut args =
        split("videotestsrc num-buffers=20 ! video/x-raw,width=160,height=120,framerate=10/1 !");
    args.extend(caption_args("c"));
    args.extend(split("! x264enc ! matroskamux name=m ! filesink"));
    args.push(format!("location={}", file.display()));
    args.extend(split("c.text_src ! m.subtitle_%u"));
    let output = launch(&args);
    assert!(
        output.stdout.contains("Got EOS from element"),
        "{}",
        output.all()
    );
    let posted = caption_lines(&output).len();

    let (video, subtitles, caps) = demux_counts(&file);
    assert_eq!(video, 20, "every video frame in the file");
    assert_eq!(subtitles, posted, "one subtitle per caption");
    let caps = caps.expect("subtitle caps");
    assert_eq!(caps.structure(0).unwrap().name(), "text/x-raw", "{caps}");
}
