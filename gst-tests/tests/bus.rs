//! What the element posts and how: nothing while one of its locks is held (a synchronous bus
//! handler may call straight back into it), and messages a user can read (issue 9, items 3
//! and 9).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use gst::prelude::*;
use gst_video::VideoFormat;
use llamavid_gst_tests::*;

/// Installs a synchronous handler on the element's bus that sets `sample-interval` (a property
/// whose setter takes the element's settings and stream locks) whenever a message of `kind`
/// is posted, and counts them.
fn set_property_on(
    element: &gst::Element,
    bus: &gst::Bus,
    kind: gst::MessageType,
) -> Arc<AtomicUsize> {
    let seen = Arc::new(AtomicUsize::new(0));
    let (weak, counter) = (element.downgrade(), seen.clone());
    bus.set_sync_handler(move |_bus, msg| {
        if msg.type_() == kind {
            counter.fetch_add(1, Ordering::SeqCst);
            if let Some(element) = weak.upgrade() {
                element.set_property("sample-interval", 100u64);
            }
        }
        gst::BusSyncReply::Pass
    });
    seen
}

#[test]
fn a_sync_bus_handler_may_set_properties_when_frames_are_dropped() {
    // Every frame sampled, pushed at once, dropping: a QoS message per dropped frame. It used
    // to be posted with the stream lock held, and the handler's set_property deadlocked the
    // streaming thread (the push then hangs and `push` fails the test).
    let element = caption_element();
    element.set_property_from_str("frame-policy", "drop");
    let mut run = CaptionRun::new(element, video_info(VideoFormat::Rgbx, 64, 48));
    let qos = set_property_on(&run.element, &run.bus.bus.clone(), gst::MessageType::Qos);
    // 120 frames: a drop needs two frames to arrive within one encode, which a busy machine
    // (the pusher descheduled between pushes) once failed to give in 40.
    run.push_frames_until(11900);
    run.finish();
    assert!(qos.load(Ordering::SeqCst) > 0, "no frame was dropped");
    assert_eq!(
        qos.load(Ordering::SeqCst) as u64,
        run.element.property::<u64>("frames-dropped")
    );
}

#[test]
fn a_sync_bus_handler_may_set_properties_on_an_element_error() {
    // A buffer before caps is an error, posted from the streaming thread.
    init();
    let element = caption_element();
    let bus = gst::Bus::new();
    element.set_bus(Some(&bus));
    let errors = set_property_on(&element, &bus, gst::MessageType::Error);
    let mut harness = gst_check::Harness::with_element(&element, Some("sink"), Some("src"));
    let info = video_info(VideoFormat::Rgbx, 64, 48);
    let buffer = timed(video_frame(&info, 0), 0, 100);
    let pushed = within("pushing a buffer before caps", TIMEOUT, move || {
        let result = harness.push(buffer);
        drop(harness);
        result
    });
    assert!(pushed.is_err(), "a buffer before caps is refused");
    assert_eq!(errors.load(Ordering::SeqCst), 1);
}
