//! The element with its language model on a server (`llm-server`), against a test double of
//! the server (127.0.0.1): captions come from the server's ids, and every fault behaves as
//! documented: an unreachable server warns and is retried with backoff while video passes and
//! frames keep being encoded; a server that comes back resumes the captions; a refusal (4xx)
//! is an element error quoting the server; a slow server makes captions late, never two
//! requests at once.

use std::time::{Duration, Instant};

use gst::prelude::*;
use gstllamavid::model::{LanguageModelWeights, LlamaVid, LoadOptions};
use llamavid_gst_tests::fake_llm_server::{FakeLlmServer, Reply};
use llamavid_gst_tests::*;

const SERVED: &str = "llamavid-llm";

/// The element configured for the fixture with its language model on `url`.
fn remote_element(url: &str) -> gst::Element {
    let element = caption_element();
    element.set_property("llm-server", url);
    element.set_property("llm-server-model", SERVED);
    element.set_property("llm-server-timeout", 5000u64);
    element
}

fn run_on(element: gst::Element) -> CaptionRun {
    CaptionRun::new(element, video_info(gst_video::VideoFormat::Rgb, 64, 48))
}

/// The caption text the fixture's tokenizer makes of `ids`, as the local path would.
fn text_of(ids: &[u32]) -> String {
    let mut options = LoadOptions::new(model_dir());
    options.language_model = LanguageModelWeights::EmbeddingsOnly;
    let model = LlamaVid::load(&options).expect("the fixture loads");
    model.caption_from_ids(ids.to_vec()).unwrap().text
}

/// Waits until `done` holds of the element's bus messages, or fails after [`TIMEOUT`].
fn wait_bus(run: &mut CaptionRun, what: &str, done: impl Fn(&[gst::Message]) -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !done(run.bus.drain()) {
        assert!(Instant::now() < deadline, "no {what} within {TIMEOUT:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn captions_are_the_servers_ids_decoded_by_the_checkpoints_tokenizer() {
    let server = FakeLlmServer::start(SERVED);
    server.set_default(Reply::Completion {
        token_ids: vec![100, 101, 102],
        finish_reason: "stop",
    });
    let mut run = run_on(remote_element(&server.url()));
    run.push_frames_until(1200);
    let items = run.finish();
    let expected = text_of(&[100, 101, 102]);
    let captions = text_captions(&items);
    assert!(!captions.is_empty(), "no caption: {items:?}");
    for (_, _, text) in &captions {
        assert_eq!(text, &expected);
    }
    assert_eq!(run.pull_all().len(), 13, "every video buffer passed");
    // Each request carries the window's input embeddings and the element's sampling settings.
    let requests = server.completions();
    assert!(!requests.is_empty());
    for request in &requests {
        let body = request.json();
        assert_eq!(body["model"], SERVED);
        assert_eq!(body["max_tokens"], 4);
        assert_eq!(body["temperature"], 0.0);
        assert!(body["prompt_embeds"]
            .as_str()
            .is_some_and(|s| s.len() > 100));
    }
    assert!(run.bus.errors().is_empty(), "{:?}", run.bus.errors());
}

#[test]
fn an_unreachable_server_warns_and_video_and_encoding_go_on() {
    let mut run = run_on(remote_element(&FakeLlmServer::unused_url()));
    run.push_frames_until(2000);
    wait_bus(&mut run, "warning", |m| !warnings(m).is_empty());
    let items = run.finish();
    assert!(text_captions(&items).is_empty(), "no server, no caption");
    assert_eq!(run.pull_all().len(), 21, "video never stalls");
    let encoded: u64 = run.element.property("frames-encoded");
    assert_eq!(encoded, 21, "every sampled frame was still encoded");
    let messages = run.bus.drain().to_vec();
    assert!(errors(&messages).is_empty(), "{:?}", errors(&messages));
    // Only the server's warnings count here (the context bound of the window warns too).
    let warned: Vec<String> = warnings(&messages)
        .into_iter()
        .filter(|w| w.contains("language-model server"))
        .collect();
    assert_eq!(warned.len(), 1, "one warning per outage: {warned:?}");
    assert!(warned[0].contains("unreachable"), "{}", warned[0]);
}

#[test]
fn captions_resume_when_the_server_comes_back() {
    let mut server = FakeLlmServer::start(SERVED);
    server.stop();
    let mut run = run_on(remote_element(&server.url()));
    run.push_frames_until(1000);
    wait_bus(&mut run, "warning", |m| !warnings(m).is_empty());
    assert!(text_captions(&run.text.items()).is_empty());
    server.restart();
    // Frames keep coming; after the backoff a due caption reaches the server again.
    let mut pts = 1100;
    let deadline = Instant::now() + TIMEOUT;
    while run.text.captions().is_empty() {
        assert!(Instant::now() < deadline, "captions did not resume");
        run.push_frame(pts);
        pts += 100;
        std::thread::sleep(Duration::from_millis(50));
    }
    let messages = run.bus.drain().to_vec();
    assert!(errors(&messages).is_empty(), "{:?}", errors(&messages));
    let recovered = messages.iter().any(|m| match m.view() {
        gst::MessageView::Info(i) => i.error().message().contains("answers again"),
        _ => false,
    });
    assert!(recovered, "an info message says the server is back");
    run.finish();
}

#[test]
fn a_refusal_is_an_element_error_quoting_the_server() {
    let server = FakeLlmServer::start(SERVED);
    server.set_default(Reply::error(
        400,
        "You must set `--enable-prompt-embeds` to input `prompt_embeds`.",
    ));
    let mut run = run_on(remote_element(&server.url()));
    run.push_frames_until(600);
    wait_bus(&mut run, "error", |m| !errors(m).is_empty());
    let errors = run.bus.errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("--enable-prompt-embeds"),
        "{}",
        errors[0]
    );
    assert!(errors[0].contains("HTTP 400"), "{}", errors[0]);
}

#[test]
fn a_model_the_server_does_not_serve_is_an_error_naming_both() {
    let server = FakeLlmServer::start("another-model");
    let mut run = run_on(remote_element(&server.url()));
    run.push_frame(0);
    wait_bus(&mut run, "error", |m| !errors(m).is_empty());
    let errors = run.bus.errors();
    assert!(
        errors[0].contains(SERVED) && errors[0].contains("another-model"),
        "{}",
        errors[0]
    );
    assert!(server.completions().is_empty(), "no caption was sent");
}

#[test]
fn a_slow_server_makes_captions_late_with_one_request_in_flight() {
    let server = FakeLlmServer::start(SERVED);
    server.set_default(Reply::Delayed(
        Duration::from_millis(1500),
        Box::new(Reply::completion(&[100])),
    ));
    let element = remote_element(&server.url());
    element.set_property("caption-interval", 100u64);
    element.set_property("latency", 200u64);
    let mut run = run_on(element);
    // 3 s of frames at the wall-clock pace: ~30 captions fall due, a reply takes 1.5 s.
    for pts in (0..=3000).step_by(100) {
        run.push_frame(pts);
        std::thread::sleep(Duration::from_millis(100));
    }
    let encoded: u64 = run.element.property("frames-encoded");
    assert_eq!(encoded, 31, "frames were encoded while the server was busy");
    let items = run.finish();
    assert_eq!(
        server.max_in_flight(),
        1,
        "one request in flight per stream"
    );
    let sent = server.completions().len();
    assert!(
        (2..=5).contains(&sent),
        "{sent} requests for ~30 due captions"
    );
    assert!(!text_captions(&items).is_empty());
    let late = warnings(run.bus.drain());
    assert!(
        late.iter()
            .any(|w| w.contains("later than the declared latency")),
        "late captions are reported: {late:?}"
    );
    let latency: u64 = run.element.property("last-caption-latency");
    assert!(latency >= 1000, "latency {latency} ms");
}

/// The start-up probe (`/v1/models`) is not a caption: one that falls due while the probe is
/// still on its way waits for it and then goes to the server, instead of being skipped.
#[test]
fn a_caption_due_during_the_start_up_probe_is_sent_after_it() {
    let server = FakeLlmServer::start(SERVED);
    server.set_models_delay(Duration::from_millis(1500));
    server.set_default(Reply::Completion {
        token_ids: vec![100, 101, 102],
        finish_reason: "stop",
    });
    let element = remote_element(&server.url());
    element.set_property("caption-interval", 400u64);
    let mut run = run_on(element);
    // Frames up to the first due caption, then nothing more: only that caption can come.
    for pts in (0..=400).step_by(100) {
        run.push_frame(pts);
    }
    run.text
        .wait_for("the caption due during the probe", |items| {
            !text_captions(items).is_empty()
        });
    let items = run.finish();
    assert_eq!(text_captions(&items)[0].2, text_of(&[100, 101, 102]));
    assert_eq!(
        server.completions().len(),
        1,
        "one request, after the probe"
    );
    assert!(run.bus.errors().is_empty(), "{:?}", run.bus.errors());
}
