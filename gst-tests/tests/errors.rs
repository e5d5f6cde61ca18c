//! Misconfiguration fails the change to READY, with an error on the bus that names what is
//! wrong (the property or the file), quickly, without a panic or a hang.

use std::path::Path;

use gst::prelude::*;
use llamavid_gst_tests::*;

/// The error an element posted: its message (what applications show) and its debug details.
struct PostedError {
    message: String,
    debug: String,
}

impl PostedError {
    fn all(&self) -> String {
        format!("{} ({})", self.message, self.debug)
    }
}

/// Sets `element` to READY, which must fail, and returns the one error posted on its bus. The
/// element must then go back to NULL cleanly.
fn ready_fails(element: gst::Element) -> PostedError {
    let mut bus = BusLog::attach(&element);
    let result = set_state_within(&element, gst::State::Ready);
    let posted: Vec<PostedError> = bus
        .drain()
        .iter()
        .filter_map(|m| match m.view() {
            gst::MessageView::Error(e) => Some(PostedError {
                message: e.error().message().to_owned(),
                debug: e.debug().map(|d| d.to_string()).unwrap_or_default(),
            }),
            _ => None,
        })
        .collect();
    set_state_within(&element, gst::State::Null).expect("back to NULL");
    assert!(result.is_err(), "READY succeeded");
    assert_eq!(
        posted.len(),
        1,
        "one error message: {:?}",
        posted.iter().map(PostedError::all).collect::<Vec<_>>()
    );
    let error = posted.into_iter().next().unwrap();
    println!("{}", error.all());
    assert!(
        !error.all().to_lowercase().contains("panic"),
        "an error, not a panic: {}",
        error.all()
    );
    error
}

/// The element as the tests configure it, with `model` pointing at `dir`.
fn element_with_model(dir: &Path) -> gst::Element {
    let element = caption_element();
    element.set_property("model", dir.to_str().unwrap());
    element
}

/// The error, message or debug details, names `what`.
fn assert_mentions(error: &PostedError, what: &str) {
    assert!(
        error.all().contains(what),
        "the error should mention {what:?}: {}",
        error.all()
    );
}

#[test]
fn no_model_set_names_the_model_property() {
    init();
    let element = gst::ElementFactory::make("llamavidcaption")
        .build()
        .unwrap();
    let error = ready_fails(element);
    assert_mentions(&error, "`model`");
}

#[test]
fn a_missing_model_directory_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-model");
    let error = ready_fails(element_with_model(&missing));
    assert_mentions(&error, missing.to_str().unwrap());
}

#[test]
fn a_directory_without_config_json_is_not_a_model() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("README"), "not a model").unwrap();
    let error = ready_fails(element_with_model(dir.path()));
    assert_mentions(&error, "config.json");
}

#[test]
fn a_missing_eva_vision_tower_file_is_named() {
    let (_tmp, model) = copy_fixture();
    let eva = model
        .parent()
        .unwrap()
        .join("model_zoo/LAVIS/eva_vit_g.pth");
    std::fs::remove_file(&eva).expect("the fixture has its EVA file beside the model");
    let error = ready_fails(element_with_model(&model));
    assert_mentions(&error, "eva_vit_g.pth");
}

#[test]
fn a_vision_tower_property_naming_a_missing_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("elsewhere.pth");
    let element = caption_element();
    element.set_property("vision-tower", missing.to_str().unwrap());
    let error = ready_fails(element);
    assert_mentions(&error, "elsewhere.pth");
}

/// Cuts `file` to half its size.
fn truncate(file: &Path) {
    let len = std::fs::metadata(file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
}

#[test]
fn a_truncated_weight_shard_is_named() {
    // The release format: sharded PyTorch pickles (the fixture's extra safetensors copy, which
    // would be preferred, is removed).
    let (_tmp, model) = copy_fixture();
    std::fs::remove_file(model.join("model.safetensors")).unwrap();
    let shard = model.join("pytorch_model-00002-of-00002.bin");
    assert!(shard.is_file(), "the fixture's second shard");
    truncate(&shard);
    let error = ready_fails(element_with_model(&model));
    assert_mentions(&error, "pytorch_model-00002-of-00002.bin");
}

#[test]
fn a_truncated_safetensors_file_is_named() {
    let (_tmp, model) = copy_fixture();
    truncate(&model.join("model.safetensors"));
    let error = ready_fails(element_with_model(&model));
    assert_mentions(&error, "model.safetensors");
}

#[test]
#[cfg_attr(feature = "cuda", ignore = "this build has CUDA support")]
fn device_cuda_says_cuda_is_not_built_in() {
    for device in ["cuda", "cuda:1"] {
        let element = caption_element();
        element.set_property("device", device);
        let error = ready_fails(element);
        assert!(
            error.all().contains("no CUDA support"),
            "device={device} should say CUDA is not built in: {}",
            error.all()
        );
        assert_mentions(&error, "device");
    }
}

#[test]
fn an_invalid_device_string_names_the_device_property() {
    for device in ["tpu", "cuda:x", "gpu0"] {
        let element = caption_element();
        element.set_property("device", device);
        let error = ready_fails(element);
        assert_mentions(&error, "device");
        assert_mentions(&error, device);
    }
}

#[test]
fn a_fixed_configuration_loads_after_a_failure() {
    // A failed load leaves nothing behind: the same element with the model fixed starts.
    let dir = tempfile::tempdir().unwrap();
    let element = element_with_model(dir.path());
    ready_fails(element.clone());
    element.set_property("model", model_dir().to_str().unwrap());
    set_state_within(&element, gst::State::Ready).expect("READY with a valid model");
    set_state_within(&element, gst::State::Null).unwrap();
}

#[test]
fn the_error_message_itself_says_what_is_wrong() {
    // Applications show the message (gst-launch prints it on the ERROR line, the debug details
    // only as "Additional debug info"), so the message must name the property or the file.
    let no_model = || {
        init();
        gst::ElementFactory::make("llamavidcaption")
            .build()
            .unwrap()
    };
    let missing = tempfile::tempdir().unwrap();
    let missing_model = missing.path().join("no-such-model");
    let with_device = |device: &str| {
        let element = caption_element();
        element.set_property("device", device);
        element
    };
    for (element, what) in [
        (no_model(), "model"),
        (element_with_model(&missing_model), "no-such-model"),
        (with_device("tpu"), "tpu"),
        (with_device("cuda"), "CUDA"),
    ] {
        let error = ready_fails(element);
        assert!(
            error.message.contains(what),
            "the message should name {what:?}: {:?} (details: {:?})",
            error.message,
            error.debug
        );
    }
}

#[test]
fn a_prompt_the_model_cannot_take_fails_ready_naming_the_prompt() {
    // Issue 9 items 1 and 2: checked against the model at READY, not when the first caption
    // is due (where it used to end the stream).
    let element = caption_element();
    element.set_property("prompt", "why ".repeat(2000));
    let error = ready_fails(element);
    assert_mentions(&error, "`prompt`");
    assert_mentions(&error, "too long");
}

#[test]
fn a_window_longer_than_the_context_is_a_warning_at_ready() {
    init();
    let element = caption_element();
    element.set_property("sample-interval", 10u64);
    element.set_property("window-duration", 60_000u64);
    let mut bus = BusLog::attach(&element);
    set_state_within(&element, gst::State::Ready).expect("READY");
    let warnings = bus.warnings();
    set_state_within(&element, gst::State::Null).unwrap();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("window-duration=60000 ms")
            && warnings[0].contains("sample-interval=10 ms"),
        "{warnings:?}"
    );
}
