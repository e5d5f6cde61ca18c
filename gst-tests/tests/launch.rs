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
    // Every property of the element, as the element itself lists them (so that a new one is
    // covered without touching this test), with its blurb.
    init();
    let element = gst::ElementFactory::make("llamavidcaption")
        .build()
        .unwrap();
    let properties = element.list_properties();
    for must in [
        "dtype",
        "threads",
        "encode-batch",
        "caption-batch",
        "frames-batched",
        "lower-thread-priority",
        "tune-allocator",
        "cpu-isa",
        "frame-policy",
        "window-duration",
        "prompt",
    ] {
        assert!(
            properties.iter().any(|p| p.name() == must),
            "the element has no {must} property"
        );
    }
    for pspec in properties.iter() {
        let name = pspec.name();
        let line = text
            .lines()
            // "  name   : blurb", or "  long-name: blurb".
            .find(|l| {
                l.trim_start()
                    .strip_prefix(name)
                    .is_some_and(|rest| rest.trim_start().starts_with(':'))
            })
            .unwrap_or_else(|| panic!("property {name} missing from:\n{text}"));
        let blurb = pspec.blurb().unwrap_or_default();
        assert!(
            !blurb.is_empty() && line.contains(blurb),
            "property {name} shows its blurb {blurb:?}: {line}"
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
    // Issue 9 item 17: no placeholder origin is shipped as the plugin's metadata.
    let origin = plugin
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("Origin URL"))
        .unwrap_or_else(|| panic!("no Origin URL in:\n{}", plugin.stdout));
    assert!(
        !origin.contains("example") && !origin.contains(".invalid"),
        "a placeholder origin: {origin}"
    );
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

    let content = matroska_content(&file);
    assert_eq!(content.video_frames, 20, "every video frame in the file");
    assert_eq!(content.subtitles.len(), posted, "one subtitle per caption");
    let caps = content.subtitle_caps.expect("subtitle caps");
    assert_eq!(caps.structure(0).unwrap().name(), "text/x-raw", "{caps}");
}

/// Replaces `shard` by a PyTorch zip whose pickle has an unknown op-code: candle's reader fails
/// with `bail!`, which captures a backtrace when `RUST_BACKTRACE` is set.
fn write_corrupt_pickle(shard: &std::path::Path) {
    use std::io::Write;
    let mut zip = zip::ZipWriter::new(std::fs::File::create(shard).unwrap());
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", options).unwrap();
    zip.write_all(b"\x80\x02\xff").unwrap();
    zip.start_file("archive/version", options).unwrap();
    zip.write_all(b"3\n").unwrap();
    zip.finish().unwrap();
}

#[test]
fn error_messages_carry_no_backtrace_even_with_rust_backtrace_set() {
    // Issue 9 item 3: a user with RUST_BACKTRACE=1 in their environment got candle's whole
    // backtrace as the error message. gst-launch prints the message on the ERROR line and the
    // details after "Additional debug info:": both must be a line or two a user can act on.
    let (_tmp, model) = copy_fixture();
    std::fs::remove_file(model.join("model.safetensors")).unwrap();
    let shard = model.join("pytorch_model-00001-of-00002.bin");
    assert!(shard.is_file(), "the fixture's first shard");
    write_corrupt_pickle(&shard);
    let args = [
        "videotestsrc".to_owned(),
        "num-buffers=1".to_owned(),
        "!".to_owned(),
        "llamavidcaption".to_owned(),
        format!("model={}", model.display()),
        "device=cpu".to_owned(),
        "!".to_owned(),
        "fakesink".to_owned(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = gst_tool_with_env(
        "gst-launch-1.0",
        &args,
        &[("RUST_BACKTRACE", "1")],
        TOOL_TIMEOUT,
    );
    assert!(
        !output.success,
        "a corrupt shard cannot load:\n{}",
        output.all()
    );
    let all = output.all();
    let lines: Vec<&str> = all.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("ERROR: from element"))
        .unwrap_or_else(|| panic!("no ERROR line:\n{all}"));
    assert!(
        lines[at].contains("pytorch_model-00001-of-00002.bin"),
        "the message names the file: {}",
        lines[at]
    );
    assert_eq!(lines.get(at + 1), Some(&"Additional debug info:"), "{all}");
    let details: Vec<&&str> = lines[at + 2..]
        .iter()
        .take_while(|l| {
            !l.trim().is_empty() && !l.starts_with("ERROR") && !l.starts_with("Setting")
        })
        .collect();
    assert!(details.len() <= 2, "details: {details:#?}");
    // Backtrace frames look like "  3: candle_core::pickle::Stack::read" then
    // "      at /path/src/pickle.rs:315:21", on lines of their own or joined into one.
    let frame = |l: &&str| {
        let t = l.trim_start();
        t.starts_with("at /")
            || t.split_once(": ")
                .is_some_and(|(n, _)| n.parse::<u32>().is_ok())
            || l.contains("/rustc/")
            || l.contains("candle_core::error::Error::bt")
    };
    assert!(
        !lines.iter().any(frame),
        "a backtrace frame in the output:\n{all}"
    );
    assert!(lines[at].len() < 400, "one readable line: {}", lines[at]);
}
