//! What the pipeline examples (`llamavid-cameras`, `llamavid-events`, `llamavid-live`,
//! `llamavid-overlay`, `llamavid-subtitle`) share: GStreamer's set-up, the options that
//! configure `llamavidcaption`, sources given as a gst-launch fragment or a file, the pipeline
//! of N cameras, the caption bus messages and the loop that reads them.

use std::path::Path;

use anyhow::{bail, Context, Result};
use gst::prelude::*;

/// The options every pipeline example takes for its `llamavidcaption` elements: `--model DIR`,
/// `--prompt Q` and `--set PROPERTY=VALUE` (repeatable).
#[derive(Debug, Default, Clone)]
pub struct CaptionSettings {
    pub model: String,
    pub prompt: Option<String>,
    /// `--set` in the order given (a later one wins).
    pub properties: Vec<(String, String)>,
}

/// Help text for the options of [`CaptionSettings`], to append to an example's usage.
pub const CAPTION_OPTIONS_USAGE: &str = "--model DIR [--prompt Q] [--set PROPERTY=VALUE]...";

impl CaptionSettings {
    /// Takes `arg` (and its value from `args`) when it is one of the shared options; false
    /// when it is not, so that the example handles it.
    pub fn take_option(
        &mut self,
        arg: &str,
        args: &mut impl Iterator<Item = String>,
        usage: &str,
    ) -> Result<bool> {
        match arg {
            "--model" => self.model = option_value(arg, args, usage)?,
            "--prompt" => self.prompt = Some(option_value(arg, args, usage)?),
            "--set" => {
                let setting = option_value(arg, args, usage)?;
                let (name, value) = setting
                    .split_once('=')
                    .with_context(|| format!("--set {setting}: expected PROPERTY=VALUE"))?;
                self.properties.push((name.into(), value.into()));
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Fails when a required option is missing.
    pub fn check(&self, usage: &str) -> Result<()> {
        if self.model.is_empty() {
            bail!("--model is required\n{usage}");
        }
        Ok(())
    }

    /// Sets `model`, `prompt` and every `--set` on `element`. A property that does not exist,
    /// is read-only or does not take the value is an error naming it (GStreamer's own setters
    /// would abort the program).
    pub fn apply(&self, element: &gst::Element) -> Result<()> {
        element.set_property("model", &self.model);
        if let Some(prompt) = &self.prompt {
            element.set_property("prompt", prompt);
        }
        for (name, value) in &self.properties {
            let pspec = element
                .find_property(name)
                .with_context(|| format!("llamavidcaption has no property `{name}`"))?;
            if !pspec.flags().contains(gst::glib::ParamFlags::WRITABLE) {
                bail!("llamavidcaption's property `{name}` is read-only");
            }
            let parsed = gst::glib::Value::deserialize_with_pspec(value, &pspec)
                .ok()
                .filter(|v| value_is_valid(&pspec, v))
                .with_context(|| {
                    format!(
                        "--set {name}={value}: not a valid value of `{name}` ({})",
                        pspec.blurb().unwrap_or_default()
                    )
                })?;
            element.set_property_from_value(name, &parsed);
        }
        Ok(())
    }
}

/// Whether `value` is one `pspec` takes (in range, a known enum value, ...): GObject's own check
/// before setting, `g_param_value_validate`, on a copy (it reports whether it had to change
/// it). glib-rs would abort on such a value; `ParamSpec::value_is_valid` needs its GLib 2.74
/// feature, which would make this crate's build of glib differ from the plugin's.
fn value_is_valid(pspec: &gst::glib::ParamSpec, value: &gst::glib::Value) -> bool {
    use gst::glib::translate::{from_glib, ToGlibPtr, ToGlibPtrMut};
    let mut copy = value.clone();
    // SAFETY: both pointers are valid for the call, and the copy is ours to change.
    let changed: bool = unsafe {
        from_glib(gst::glib::gobject_ffi::g_param_value_validate(
            pspec.to_glib_none().0,
            copy.to_glib_none_mut().0,
        ))
    };
    !changed
}

/// Initialises GStreamer and registers `llamavidcaption` statically, so that the examples run
/// whether or not the plugin is installed.
pub fn init() -> Result<()> {
    gst::init()?;
    gstllamavid::plugin_register_static()?;
    Ok(())
}

/// The value after option `arg`, or an error with the usage.
pub fn option_value(
    arg: &str,
    args: &mut impl Iterator<Item = String>,
    usage: &str,
) -> Result<String> {
    args.next()
        .with_context(|| format!("{arg} needs a value\n{usage}"))
}

/// The sources of `--cameras N`: a live test pattern per camera, `{k}` the camera's number
/// (see [`numbered_source`]).
pub const TEST_PATTERN_SOURCE: &str =
    "videotestsrc is-live=true pattern={k} ! video/x-raw,width=320,height=240,framerate=10/1";

/// A source of raw video as a gst-launch fragment: an existing file is decoded
/// (`uridecodebin`, its first video stream), anything else is taken as a fragment itself.
pub fn source_fragment(spec: &str) -> Result<String> {
    let path = Path::new(spec);
    if !path.is_file() {
        return Ok(spec.to_owned());
    }
    let absolute = path
        .canonicalize()
        .with_context(|| format!("{}", path.display()))?;
    // The URI is percent-encoded, so it holds no quote or space that would break the fragment.
    let uri = gst::glib::filename_to_uri(&absolute, None)
        .with_context(|| format!("{} as a URI", absolute.display()))?;
    Ok(format!(
        "uridecodebin uri=\"{uri}\" caps=video/x-raw ! videoconvert"
    ))
}

/// Camera `k`'s source from a fragment in which `{k}` stands for the camera's number
/// ([`TEST_PATTERN_SOURCE`], `v4l2src device=/dev/video{k}`, ...).
pub fn numbered_source(template: &str, k: usize) -> String {
    template.replace("{k}", &k.to_string())
}

/// One camera's branch of a gst-launch description: `source` into an `llamavidcaption` named
/// `name`, its video into a fakesink that keeps the pace of the clock, its text into a fakesink
/// that never waits (captions are read from the bus).
fn camera_branch(name: &str, source: &str) -> String {
    format!(
        "{source} ! llamavidcaption name={name} ! fakesink sync=true \
         {name}.text_src ! fakesink sync=false "
    )
}

/// One pipeline of `camera_branch`es, one per source, their elements named `camera-0`,
/// `camera-1`, ... by position (so that a camera's own name may hold any character), each set
/// up by `caption`. Returns the pipeline and the elements in the order of `sources`.
pub fn camera_pipeline(
    sources: &[String],
    caption: &CaptionSettings,
) -> Result<(gst::Pipeline, Vec<gst::Element>)> {
    let names: Vec<String> = (0..sources.len()).map(|k| format!("camera-{k}")).collect();
    let description: String = names
        .iter()
        .zip(sources)
        .map(|(name, source)| camera_branch(name, source))
        .collect();
    let pipeline = launch(&description)?;
    let elements: Vec<gst::Element> = names
        .iter()
        .map(|name| element(&pipeline, name))
        .collect::<Result<_>>()?;
    for element in &elements {
        caption.apply(element)?;
    }
    Ok((pipeline, elements))
}

/// Parses a gst-launch description into a pipeline.
pub fn launch(description: &str) -> Result<gst::Pipeline> {
    gst::parse::launch(description)
        .with_context(|| format!("cannot build the pipeline `{description}`"))?
        .downcast::<gst::Pipeline>()
        .map_err(|_| anyhow::anyhow!("`{description}` is not a pipeline"))
}

/// The element named `name` in `pipeline`.
pub fn element(pipeline: &gst::Pipeline, name: &str) -> Result<gst::Element> {
    pipeline
        .by_name(name)
        .with_context(|| format!("no element `{name}` in the pipeline"))
}

/// Sends EOS to `pipeline` after `seconds` (each element then makes its final caption), from a
/// thread of its own; nothing when `seconds` is None.
pub fn eos_after(pipeline: &gst::Pipeline, seconds: Option<f64>) {
    let Some(seconds) = seconds else { return };
    let weak = pipeline.downgrade();
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs_f64(seconds));
        if let Some(pipeline) = weak.upgrade() {
            pipeline.send_event(gst::event::Eos::new());
        }
    });
}

/// `--seconds S`: a positive, finite number.
pub fn parse_seconds(value: &str) -> Result<f64> {
    let seconds: f64 = value
        .parse()
        .with_context(|| format!("--seconds {value}: not a number"))?;
    if !(seconds.is_finite() && seconds > 0.0) {
        bail!("--seconds {value}: must be above 0");
    }
    Ok(seconds)
}

/// The fields of one `llamavid-caption` bus message (see the README, "Outputs and timestamps").
#[derive(Debug, Clone, PartialEq)]
pub struct Caption {
    pub text: String,
    /// Running time (ns) of the first and last frame of the captioned window.
    pub start: u64,
    pub end: u64,
    /// Running time (ns) of the caption's text buffer.
    pub pts: u64,
    pub frames: u32,
    pub batch: u32,
    /// ns from the arrival of the window's last frame to the caption.
    pub latency: u64,
}

impl Caption {
    /// The caption of an element message named `llamavid-caption`; None for other messages.
    pub fn from_message(msg: &gst::Message) -> Option<Caption> {
        let gst::MessageView::Element(e) = msg.view() else {
            return None;
        };
        let s = e.structure()?;
        if s.name() != gstllamavid::llamavidcaption::CAPTION_MESSAGE {
            return None;
        }
        let ns = |f: &str| s.get::<u64>(f).unwrap_or(0);
        Some(Caption {
            text: s.get::<String>("text").unwrap_or_default(),
            start: ns("start"),
            end: ns("end"),
            pts: ns("pts"),
            frames: s.get::<u32>("frames").unwrap_or(0),
            batch: s.get::<u32>("batch").unwrap_or(0),
            latency: ns("latency"),
        })
    }
}

/// Reads `pipeline`'s bus until EOS: calls `on_caption` with the posting element's name for
/// every caption, prints warnings to stderr, and fails on the first error.
pub fn run_bus(
    pipeline: &gst::Pipeline,
    mut on_caption: impl FnMut(&str, &Caption) -> Result<()>,
) -> Result<()> {
    let bus = pipeline.bus().context("the pipeline has no bus")?;
    for msg in bus.iter_timed(gst::ClockTime::NONE) {
        let source = msg.src().map(|s| s.name().to_string()).unwrap_or_default();
        if let Some(caption) = Caption::from_message(&msg) {
            on_caption(&source, &caption)?;
            continue;
        }
        match msg.view() {
            gst::MessageView::Warning(w) => {
                eprintln!("{source}: warning: {} ({:?})", w.error(), w.debug())
            }
            gst::MessageView::Error(e) => bail!("{source}: {} ({:?})", e.error(), e.debug()),
            gst::MessageView::Eos(_) => break,
            _ => {}
        }
    }
    Ok(())
}

/// A [`gst::ClockTime`] from ns, for printing.
pub fn clock_time(ns: u64) -> gst::ClockTime {
    gst::ClockTime::from_nseconds(ns)
}

/// `unix_ns` (ns since 1970-01-01 UTC) as RFC 3339 in UTC with milliseconds,
/// `2024-05-01T12:00:00.123Z`.
pub fn rfc3339_utc(unix_ns: u64) -> String {
    let seconds = unix_ns / 1_000_000_000;
    let millis = (unix_ns / 1_000_000) % 1000;
    let days = (seconds / 86_400) as i64;
    let in_day = seconds % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        in_day / 3600,
        in_day % 3600 / 60,
        in_day % 60
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, days in 400-year eras of 146097 days).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_of_known_instants() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00.000Z");
        // 2000-02-29 (a leap day of a century leap year) 23:59:59.999.
        assert_eq!(
            rfc3339_utc(951_868_799_999_000_000),
            "2000-02-29T23:59:59.999Z"
        );
        assert_eq!(
            rfc3339_utc(1_714_564_800_123_456_789),
            "2024-05-01T12:00:00.123Z"
        );
        // 2100 is not a leap year: the day after 02-28 is 03-01.
        assert_eq!(
            rfc3339_utc(4_107_542_400_000_000_000),
            "2100-03-01T00:00:00.000Z"
        );
    }

    #[test]
    fn shared_options_are_taken_and_others_left() {
        let mut settings = CaptionSettings::default();
        let mut rest = ["DIR".to_owned()].into_iter();
        assert!(settings.take_option("--model", &mut rest, "u").unwrap());
        let mut rest = ["caption-interval=500".to_owned()].into_iter();
        assert!(settings.take_option("--set", &mut rest, "u").unwrap());
        let mut rest = ["x".to_owned()].into_iter();
        assert!(!settings.take_option("--cameras", &mut rest, "u").unwrap());
        assert_eq!(settings.model, "DIR");
        assert_eq!(
            settings.properties,
            [("caption-interval".to_owned(), "500".to_owned())]
        );
        let mut rest = ["no-equals-sign".to_owned()].into_iter();
        assert!(settings.take_option("--set", &mut rest, "u").is_err());
        assert!(settings
            .take_option("--prompt", &mut std::iter::empty(), "u")
            .is_err());
    }

    #[test]
    fn bad_settings_are_errors_not_aborts() {
        gst::init().unwrap();
        gstllamavid::plugin_register_static().unwrap();
        let element = gst::ElementFactory::make("llamavidcaption")
            .build()
            .unwrap();
        let with = |name: &str, value: &str| CaptionSettings {
            model: "DIR".into(),
            prompt: None,
            properties: vec![(name.into(), value.into())],
        };
        assert!(with("caption-interval", "500").apply(&element).is_ok());
        assert_eq!(element.property::<u64>("caption-interval"), 500);
        assert!(with("emit", "on-change").apply(&element).is_ok());
        for (name, value) in [
            ("no-such-property", "1"),
            ("caption-interval", "soon"),
            ("emit", "sometimes"),
            ("captions", "3"),
            ("change-threshold", "7"),
        ] {
            let error = with(name, value).apply(&element).unwrap_err();
            assert!(error.to_string().contains(name), "{name}: {error}");
        }
    }

    #[test]
    fn files_are_decoded_and_fragments_kept() {
        gst::init().unwrap();
        let fragment = "videotestsrc is-live=true ! videoconvert";
        assert_eq!(source_fragment(fragment).unwrap(), fragment);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a clip \"1\".mp4");
        std::fs::write(&file, b"").unwrap();
        let source = source_fragment(file.to_str().unwrap()).unwrap();
        assert!(
            source.starts_with("uridecodebin uri=\"file:///"),
            "{source}"
        );
        assert!(source.contains("a%20clip%20%221%22.mp4"), "{source}");
    }
}
