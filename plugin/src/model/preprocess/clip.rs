//! CLIP image preprocessing with transformers 4.31 `CLIPImageProcessor` semantics.
//!
//! Per frame: resize so the shorter side is `shortest_edge` (Pillow bicubic, uint8), centre crop
//! (zero padding when the image is smaller), rescale by 1/255, normalise with the CLIP mean/std,
//! lay out channel-first. Every step reproduces the reference's arithmetic, so the output matches
//! the recorded `pixel_values` to float rounding.

use std::ops::Range;
use std::path::Path;

use candle_core::{Device, Tensor};
use llamavid_kernels::preprocess::{centre_crop_offset, Normalization};
use serde_json::Value;

use super::color::{FrameView, RgbImage};
use super::resize::resize_bicubic_window;
use crate::model::error::{ModelError, Result};

/// CLIP's image mean (OpenAI), per RGB channel.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// CLIP's image standard deviation (OpenAI), per RGB channel.
// The published digits, verbatim, so they can be compared with a config file at a glance.
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// PIL's resample code for bicubic, the only filter the reference uses.
const PIL_BICUBIC: i64 = 3;

/// How a frame is resized before cropping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTarget {
    /// Shorter side to `n`, longer side `int(n * long / short)` (truncated), aspect kept.
    ShortestEdge(usize),
    /// Exactly `height` × `width`, aspect ignored (`size: {"height", "width"}` in newer
    /// transformers; 4.31 rejects it for CLIP, we accept it rather than refuse a usable config).
    Exact { height: usize, width: usize },
    /// `do_resize: false`.
    Keep,
}

/// Channel-wise `(x - mean) / std`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalize {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// The preprocessing of one `preprocessor_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipPreprocess {
    pub resize: ResizeTarget,
    /// Centre crop (height, width); `None` for `do_center_crop: false`.
    pub crop: Option<(usize, usize)>,
    /// Multiplier applied to the uint8 values (`None` for `do_rescale: false`). Kept in f64:
    /// numpy multiplies the uint8 array by a Python float in float64 and only then casts to f32.
    pub rescale: Option<f64>,
    /// `None` for `do_normalize: false`.
    pub normalize: Option<Normalize>,
}

impl ClipPreprocess {
    /// The processor LLaMA-VID ships (`clip-patch14-224`): shortest edge 224, crop 224×224, CLIP
    /// mean/std, 1/255.
    pub fn clip_224() -> Self {
        ClipPreprocess {
            resize: ResizeTarget::ShortestEdge(224),
            crop: Some((224, 224)),
            rescale: Some(1.0 / 255.0),
            normalize: Some(Normalize {
                mean: CLIP_MEAN,
                std: CLIP_STD,
            }),
        }
    }

    /// Reads a Hugging Face `preprocessor_config.json`.
    ///
    /// The `do_*` flags default to true as in transformers, `rescale_factor` to 1/255. Unlike
    /// transformers, a value an enabled step needs (`size`, `crop_size`, `image_mean`,
    /// `image_std`) must be present: a silent default would hide a wrong file.
    pub fn from_config_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::bad_file(path, format!("not valid JSON: {e}")))?;
        Self::from_config_json(&json, path)
    }

    /// [`Self::from_config_file`] on already parsed JSON; `path` only names the file in errors.
    pub fn from_config_json(json: &Value, path: &Path) -> Result<Self> {
        let cfg = ConfigReader { json, path };
        if !json.is_object() {
            return Err(ModelError::bad_file(path, "expected a JSON object"));
        }
        if let Some(v) = cfg.get("resample") {
            if v.as_i64() != Some(PIL_BICUBIC) {
                return Err(cfg.bad("resample", "only 3 (PIL bicubic) is supported"));
            }
        }
        let resize = if cfg.flag("do_resize")? {
            cfg.resize_target()?
        } else {
            ResizeTarget::Keep
        };
        let crop = if cfg.flag("do_center_crop")? {
            Some(cfg.crop_size()?)
        } else {
            None
        };
        let rescale = if cfg.flag("do_rescale")? {
            Some(match cfg.get("rescale_factor") {
                None => 1.0 / 255.0,
                Some(v) => v
                    .as_f64()
                    .ok_or_else(|| cfg.bad("rescale_factor", "expected a number"))?,
            })
        } else {
            None
        };
        let normalize = if cfg.flag("do_normalize")? {
            Some(Normalize {
                mean: cfg.channels("image_mean")?,
                std: cfg.channels("image_std")?,
            })
        } else {
            None
        };
        if let Some(n) = &normalize {
            if n.std.iter().any(|&s| s == 0.0 || !s.is_finite()) {
                return Err(cfg.bad("image_std", "must be finite and non-zero"));
            }
        }
        Ok(ClipPreprocess {
            resize,
            crop,
            rescale,
            normalize,
        })
    }

    /// (height, width) of the resized image for a `width` × `height` input.
    pub fn resized_size(&self, width: usize, height: usize) -> (usize, usize) {
        match self.resize {
            ResizeTarget::Keep => (height, width),
            ResizeTarget::Exact { height, width } => (height, width),
            ResizeTarget::ShortestEdge(edge) => shortest_edge_size(width, height, edge),
        }
    }

    /// (height, width) of the output pixels for a `width` × `height` input: the crop size when
    /// cropping, else the resized size.
    pub fn output_size(&self, width: usize, height: usize) -> (usize, usize) {
        self.crop
            .unwrap_or_else(|| self.resized_size(width, height))
    }

    /// Converts, resizes, crops and normalises one frame: `3 * h * w` values, channel-first,
    /// with (h, w) = [`Self::output_size`] (the crop size when cropping).
    pub fn pixels(&self, frame: &FrameView) -> Result<Vec<f32>> {
        let rgb = frame.to_rgb()?;
        Ok(self.pixels_from_rgb(&rgb))
    }

    /// [`Self::pixels`] for an already packed RGB image.
    pub fn pixels_from_rgb(&self, rgb: &RgbImage) -> Vec<f32> {
        let (h, w) = self.resized_size(rgb.width, rgb.height);
        let (out_h, out_w) = self.crop.unwrap_or((h, w));
        let window = CropWindow::centred(w, h, out_w, out_h);
        // Only the part of the resized image that the crop keeps is computed.
        let (cols, rows) = window.covered(out_w, out_h);
        let resized;
        let (image, origin) = if (h, w) == (rgb.height, rgb.width) {
            (rgb, (0, 0))
        } else {
            resized = resize_bicubic_window(rgb, w, h, cols.clone(), rows.clone());
            (&resized, (cols.start, rows.start))
        };

        let table = self.normalization().value_table();
        let plane = out_h * out_w;
        let mut out = vec![0f32; 3 * plane];
        for y in 0..out_h {
            for x in 0..out_w {
                let px = window
                    .source(x, y)
                    .map_or([0; 3], |(sx, sy)| image.pixel(sx - origin.0, sy - origin.1));
                for c in 0..3 {
                    out[c * plane + y * out_w + x] = table[c][usize::from(px[c])];
                }
            }
        }
        out
    }

    /// Stacks several frames into a `(B, 3, H, W)` f32 tensor on `device`. All frames must give
    /// the same output size (always true when cropping).
    pub fn tensor(&self, frames: &[FrameView], device: &Device) -> Result<Tensor> {
        let sizes = frames.iter().map(|f| self.output_size(f.width, f.height));
        let pixels = frames.iter().map(|f| self.pixels(f));
        stack(sizes, pixels, device)
    }

    /// [`Self::tensor`] for packed RGB images.
    pub fn tensor_from_rgb(&self, images: &[RgbImage], device: &Device) -> Result<Tensor> {
        let sizes = images.iter().map(|i| self.output_size(i.width, i.height));
        let pixels = images.iter().map(|i| Ok(self.pixels_from_rgb(i)));
        stack(sizes, pixels, device)
    }

    /// The rescale and normalisation as the kernels' parameters (and the CPU path's table).
    pub fn normalization(&self) -> Normalization {
        Normalization {
            rescale: self.rescale,
            mean_std: self.normalize.map(|n| (n.mean, n.std)),
        }
    }
}

/// transformers' `get_resize_output_image_size(default_to_square=False)`: (height, width).
fn shortest_edge_size(width: usize, height: usize, edge: usize) -> (usize, usize) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    if short == 0 {
        return (height, width);
    }
    // Python: int(edge * long / short), an exact integer product then a correctly rounded
    // float64 division, truncated.
    let new_long = ((edge as u128 * long as u128) as f64 / short as f64) as usize;
    if width <= height {
        (new_long, edge)
    } else {
        (edge, new_long)
    }
}

/// Where the centre crop window sits on the image, following transformers' `center_crop`:
/// `top = (h - crop_h) // 2` with floor division; an image smaller than the crop is centred on a
/// zero canvas with `(crop_h - h) // 2` rows above it.
#[derive(Debug, Clone, Copy)]
struct CropWindow {
    /// Source column of output column 0 (may be negative: padding).
    left: i64,
    /// Source row of output row 0 (may be negative: padding).
    top: i64,
    width: usize,
    height: usize,
}

impl CropWindow {
    fn centred(width: usize, height: usize, crop_w: usize, crop_h: usize) -> Self {
        CropWindow {
            left: centre_crop_offset(width, crop_w),
            top: centre_crop_offset(height, crop_h),
            width,
            height,
        }
    }

    /// The source columns and rows an `out_w` x `out_h` crop reads.
    fn covered(&self, out_w: usize, out_h: usize) -> (Range<usize>, Range<usize>) {
        let span = |start: i64, len: usize, size: usize| {
            let first = start.clamp(0, size as i64) as usize;
            let end = (start + len as i64).clamp(0, size as i64) as usize;
            first..end.max(first)
        };
        (
            span(self.left, out_w, self.width),
            span(self.top, out_h, self.height),
        )
    }

    /// The source pixel under output pixel (x, y), or `None` in the zero padding.
    fn source(&self, x: usize, y: usize) -> Option<(usize, usize)> {
        let sx = usize::try_from(self.left + x as i64).ok()?;
        let sy = usize::try_from(self.top + y as i64).ok()?;
        (sx < self.width && sy < self.height).then_some((sx, sy))
    }
}

fn stack(
    sizes: impl Iterator<Item = (usize, usize)>,
    pixels: impl Iterator<Item = Result<Vec<f32>>>,
    device: &Device,
) -> Result<Tensor> {
    let sizes: Vec<_> = sizes.collect();
    let Some(&(h, w)) = sizes.first() else {
        return Err(ModelError::InvalidInput("no frames to preprocess".into()));
    };
    if let Some(other) = sizes.iter().find(|&&s| s != (h, w)) {
        return Err(ModelError::InvalidInput(format!(
            "frames preprocess to different sizes: {h}x{w} and {}x{}",
            other.0, other.1
        )));
    }
    let mut data = Vec::with_capacity(sizes.len() * 3 * h * w);
    for p in pixels {
        data.extend_from_slice(&p?);
    }
    Ok(Tensor::from_vec(data, (sizes.len(), 3, h, w), device)?)
}

/// Field access with errors that name the file and the field.
struct ConfigReader<'a> {
    json: &'a Value,
    path: &'a Path,
}

impl ConfigReader<'_> {
    fn get(&self, field: &str) -> Option<&Value> {
        self.json.get(field).filter(|v| !v.is_null())
    }

    fn bad(&self, field: &str, msg: &str) -> ModelError {
        ModelError::bad_file(self.path, format!("field `{field}`: {msg}"))
    }

    fn required(&self, field: &str) -> Result<&Value> {
        self.get(field)
            .ok_or_else(|| self.bad(field, "missing (required by the enabled step)"))
    }

    /// A `do_*` flag, true when absent (transformers' default for CLIP).
    fn flag(&self, field: &str) -> Result<bool> {
        match self.get(field) {
            None => Ok(true),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.bad(field, "expected true or false")),
        }
    }

    fn positive(&self, field: &str, v: &Value) -> Result<usize> {
        v.as_u64()
            .filter(|&n| n > 0)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| self.bad(field, "expected a positive integer"))
    }

    /// `size`: an int (shortest edge), `{"shortest_edge": n}` or `{"height": h, "width": w}`.
    fn resize_target(&self) -> Result<ResizeTarget> {
        let v = self.required("size")?;
        if v.is_number() {
            return Ok(ResizeTarget::ShortestEdge(self.positive("size", v)?));
        }
        if let Some(n) = v.get("shortest_edge") {
            return Ok(ResizeTarget::ShortestEdge(
                self.positive("size.shortest_edge", n)?,
            ));
        }
        match (v.get("height"), v.get("width")) {
            (Some(h), Some(w)) => Ok(ResizeTarget::Exact {
                height: self.positive("size.height", h)?,
                width: self.positive("size.width", w)?,
            }),
            _ => Err(self.bad(
                "size",
                "expected an integer, {\"shortest_edge\": n} or {\"height\": h, \"width\": w}",
            )),
        }
    }

    /// `crop_size`: an int (square) or `{"height": h, "width": w}`; returns (height, width).
    fn crop_size(&self) -> Result<(usize, usize)> {
        let v = self.required("crop_size")?;
        if v.is_number() {
            let n = self.positive("crop_size", v)?;
            return Ok((n, n));
        }
        match (v.get("height"), v.get("width")) {
            (Some(h), Some(w)) => Ok((
                self.positive("crop_size.height", h)?,
                self.positive("crop_size.width", w)?,
            )),
            _ => Err(self.bad(
                "crop_size",
                "expected an integer or {\"height\": h, \"width\": w}",
            )),
        }
    }

    /// Three per-channel floats, or one float for all channels (numpy broadcasting).
    fn channels(&self, field: &str) -> Result<[f32; 3]> {
        let v = self.required(field)?;
        if let Some(x) = v.as_f64() {
            return Ok([x as f32; 3]);
        }
        let values: Option<Vec<f32>> = v
            .as_array()
            .map(|a| a.iter().map(|x| x.as_f64().map(|x| x as f32)).collect())
            .unwrap_or(None);
        match values.as_deref() {
            Some(&[r, g, b]) => Ok([r, g, b]),
            _ => Err(self.bad(field, "expected a list of 3 numbers")),
        }
    }
}
