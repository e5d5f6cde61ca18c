//! The CPU twins of the `llamavid-kernels` CUDA kernels against the model's own CPU path:
//!
//! * preprocessing: the twin, fed with the model's integer resampling weights (`AxisTaps`),
//!   YUV coefficients and `ClipPreprocess` settings, must give the model's
//!   `ClipPreprocess::pixels` bit for bit (and its uint8 stage byte for byte), on the fixture
//!   frames and on random frames of odd sizes, in every pixel format, with padded strides and
//!   planes at odd offsets;
//! * compression: the fused twin must agree with `TokenGenerator::context_attention` +
//!   `context_pooled` and `content_pooled` within 1e-5 (relative to max(1, max|x|)), on the
//!   fixture's reference tensors and on random inputs of odd sizes.
//!
//! With the `cuda` feature, the ignored `gpu_*` tests (run by `kernels/gpu-check.sh` on a
//! machine with a GPU) hold the kernels to the twins, the whole model on the GPU to the CPU,
//! and print timings.

mod common;

use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, model_dir, reference_tensor, STAGE_TOL};
use gstllamavid::model::preprocess::{
    resize_bicubic, ClipPreprocess, FrameView, Normalize, PixelFormat, ResizeTarget, RgbImage,
    YuvMatrix, YuvRange, YuvToRgb,
};
use gstllamavid::model::{LlamaVid, LoadOptions};
use llamavid_kernels::compress::{self, CompressShape};
use llamavid_kernels::preprocess::{centre_crop_offset, cpu as twin, KernelArgs};
use llamavid_kernels::{Plane, PreprocessParams};

// ---------------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------------

fn model() -> &'static LlamaVid {
    static MODEL: OnceLock<LlamaVid> = OnceLock::new();
    MODEL.get_or_init(|| LlamaVid::load(&LoadOptions::new(model_dir())).expect("fixture model"))
}

/// SplitMix64: a small deterministic generator, so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    /// Uniform in [-1, 1).
    fn signed(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.byte();
        }
    }
}

const ALL_FORMATS: [PixelFormat; 7] = PixelFormat::ALL;

/// The kernel parameters of one frame in one buffer (planes at their offsets), built by the
/// model's own code: this is what the element does when the kernel runs.
fn kernel_params(pre: &ClipPreprocess, frame: &FrameLayout, yuv: YuvToRgb) -> PreprocessParams {
    let mut params = pre.kernel_params(&frame.view(yuv));
    params.planes = frame.planes.clone();
    params
}

/// One frame in one buffer: planes at `offset`s (with gaps), rows `stride` apart (padded).
struct FrameLayout {
    format: PixelFormat,
    width: usize,
    height: usize,
    planes: Vec<Plane>,
    data: Vec<u8>,
}

impl FrameLayout {
    /// Random bytes everywhere (padding included), planes placed after random gaps.
    fn random(format: PixelFormat, width: usize, height: usize, rng: &mut Rng) -> Self {
        let mut planes = Vec::new();
        let mut end = rng.below(19);
        for i in 0..format.plane_count() {
            let (row_bytes, rows) = format.plane_extent(i, width, height);
            let stride = row_bytes + [0, 1, 3, 7, 64][rng.below(5)];
            planes.push(Plane {
                offset: end,
                stride,
            });
            end += stride * rows + rng.below(11);
        }
        let mut data = vec![0u8; end];
        rng.fill(&mut data);
        FrameLayout {
            format,
            width,
            height,
            planes,
            data,
        }
    }

    /// A packed RGB24 image written out in `format` (YUV formats via an approximate BT.601
    /// forward transform: any YUV bytes are a valid input, these just look like the image).
    fn from_rgb(
        rgb: &[u8],
        width: usize,
        height: usize,
        format: PixelFormat,
        rng: &mut Rng,
    ) -> Self {
        let mut f = FrameLayout::random(format, width, height, rng);
        let px = |x: usize, y: usize| {
            let i = (y * width + x) * 3;
            [rgb[i], rgb[i + 1], rgb[i + 2]]
        };
        let p = f.planes.clone();
        match format {
            PixelFormat::Rgb | PixelFormat::Rgbx | PixelFormat::Rgba => {
                let bpp = if format == PixelFormat::Rgb { 3 } else { 4 };
                for y in 0..height {
                    for x in 0..width {
                        let o = p[0].offset + y * p[0].stride + x * bpp;
                        f.data[o..o + 3].copy_from_slice(&px(x, y));
                    }
                }
            }
            PixelFormat::Bgrx | PixelFormat::Bgra => {
                for y in 0..height {
                    for x in 0..width {
                        let o = p[0].offset + y * p[0].stride + x * 4;
                        let [r, g, b] = px(x, y);
                        f.data[o..o + 3].copy_from_slice(&[b, g, r]);
                    }
                }
            }
            PixelFormat::I420 | PixelFormat::Nv12 => {
                let yuv = |[r, g, b]: [u8; 3]| {
                    let (r, g, b) = (f64::from(r), f64::from(g), f64::from(b));
                    let y = 16.0 + 0.257 * r + 0.504 * g + 0.098 * b;
                    let u = 128.0 - 0.148 * r - 0.291 * g + 0.439 * b;
                    let v = 128.0 + 0.439 * r - 0.368 * g - 0.071 * b;
                    [y, u, v].map(|c| c.round().clamp(0.0, 255.0) as u8)
                };
                for y in 0..height {
                    for x in 0..width {
                        let [yy, u, v] = yuv(px(x, y));
                        f.data[p[0].offset + y * p[0].stride + x] = yy;
                        if x % 2 == 0 && y % 2 == 0 {
                            let (cx, cy) = (x / 2, y / 2);
                            if format == PixelFormat::I420 {
                                f.data[p[1].offset + cy * p[1].stride + cx] = u;
                                f.data[p[2].offset + cy * p[2].stride + cx] = v;
                            } else {
                                let o = p[1].offset + cy * p[1].stride + cx * 2;
                                f.data[o] = u;
                                f.data[o + 1] = v;
                            }
                        }
                    }
                }
            }
        }
        f
    }

    /// The model's view of the same memory.
    fn view(&self, yuv: YuvToRgb) -> FrameView<'_> {
        FrameView::new(
            self.format,
            self.width,
            self.height,
            self.planes.iter().map(|p| &self.data[p.offset..]).collect(),
            self.planes.iter().map(|p| p.stride).collect(),
        )
        .with_yuv(yuv)
    }
}

/// The model's uint8 stage: convert, resize (Pillow), centre crop with zero padding; (3, h, w).
fn model_u8_stage(pre: &ClipPreprocess, rgb: &RgbImage) -> Vec<u8> {
    let (rh, rw) = pre.resized_size(rgb.width, rgb.height);
    let resized = if (rh, rw) == (rgb.height, rgb.width) {
        rgb.clone()
    } else {
        resize_bicubic(rgb, rw, rh)
    };
    let (oh, ow) = pre.crop.unwrap_or((rh, rw));
    let left = centre_crop_offset(rw, ow);
    let top = centre_crop_offset(rh, oh);
    let mut out = vec![0u8; 3 * oh * ow];
    for y in 0..oh {
        for x in 0..ow {
            let (sx, sy) = (left + x as i64, top + y as i64);
            if sx >= 0 && sy >= 0 && (sx as usize) < rw && (sy as usize) < rh {
                let p = resized.pixel(sx as usize, sy as usize);
                for c in 0..3 {
                    out[c * oh * ow + y * ow + x] = p[c];
                }
            }
        }
    }
    out
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The twin against the model for one frame: uint8 stage byte-exact, f32 output bit-exact.
fn check_frame(pre: &ClipPreprocess, frame: &FrameLayout, yuv: YuvToRgb, what: &str) -> Vec<f32> {
    let params = kernel_params(pre, frame, yuv);
    let view = frame.view(yuv);
    let expected = pre.pixels(&view).expect("model preprocesses the frame");
    let ours = twin::preprocess(&params, &frame.data).expect("twin preprocesses the frame");
    let expected_u8 = model_u8_stage(pre, &view.to_rgb().unwrap());
    let ours_u8 = twin::resample_u8(&params, &frame.data).unwrap();
    if ours_u8 != expected_u8 {
        let i = ours_u8
            .iter()
            .zip(&expected_u8)
            .position(|(a, b)| a != b)
            .unwrap();
        panic!(
            "{what}: uint8 stage differs at {i} ({} vs {}), {} of {} bytes differ",
            ours_u8[i],
            expected_u8[i],
            ours_u8
                .iter()
                .zip(&expected_u8)
                .filter(|(a, b)| a != b)
                .count(),
            ours_u8.len()
        );
    }
    assert_eq!(ours.len(), expected.len(), "{what}: output size");
    assert!(
        bits(&ours) == bits(&expected),
        "{what}: f32 output is not bit-identical"
    );
    // The same frame handed over as separate plane slices (the FrameView's own).
    let from_planes = twin::preprocess_planes(&params, &view.planes).unwrap();
    assert!(
        bits(&from_planes) == bits(&expected),
        "{what}: separate planes differ"
    );
    ours
}

fn random_yuv(rng: &mut Rng) -> YuvToRgb {
    YuvToRgb {
        matrix: [YuvMatrix::Bt601, YuvMatrix::Bt709, YuvMatrix::Bt2020][rng.below(3)],
        range: [YuvRange::Limited, YuvRange::Full][rng.below(2)],
    }
}

/// Preprocessing settings the random frames are put through: the real one, small ones, an
/// exact resize, crops larger than the image (zero padding), no crop, no normalisation.
fn configs() -> Vec<(&'static str, ClipPreprocess)> {
    let clip = ClipPreprocess::clip_224();
    vec![
        ("clip_224", clip.clone()),
        (
            "shortest 19, crop 17x13",
            ClipPreprocess {
                resize: ResizeTarget::ShortestEdge(19),
                crop: Some((17, 13)),
                ..clip.clone()
            },
        ),
        (
            "exact 37x29, crop 41x23",
            ClipPreprocess {
                resize: ResizeTarget::Exact {
                    height: 37,
                    width: 29,
                },
                crop: Some((41, 23)),
                ..clip.clone()
            },
        ),
        (
            "keep, crop 31x35, rescale only",
            ClipPreprocess {
                resize: ResizeTarget::Keep,
                crop: Some((31, 35)),
                rescale: Some(1.0 / 255.0),
                normalize: None,
            },
        ),
        (
            "shortest 11, no crop, raw",
            ClipPreprocess {
                resize: ResizeTarget::ShortestEdge(11),
                crop: None,
                rescale: None,
                normalize: Some(Normalize {
                    mean: [0.5, 0.25, 0.125],
                    std: [0.3, 0.7, 1.1],
                }),
            },
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// Preprocessing twin (CPU)
// ---------------------------------------------------------------------------------------------

#[test]
fn kernel_args_layout_matches_the_cuda_struct() {
    // cuda/preprocess.cu static_asserts sizeof(PreprocessArgs) == 144 with this field order.
    assert_eq!(std::mem::size_of::<KernelArgs>(), 144);
    assert_eq!(std::mem::offset_of!(KernelArgs, format), 48);
    assert_eq!(std::mem::offset_of!(KernelArgs, yuv), 60);
    assert_eq!(std::mem::offset_of!(KernelArgs, resized_width), 84);
    assert_eq!(std::mem::offset_of!(KernelArgs, h_starts), 116);
    assert_eq!(std::mem::offset_of!(KernelArgs, v_weights), 136);
}

#[test]
fn preprocess_twin_matches_model_on_fixture_frames() {
    let pre = model().preprocessing().clone();
    let frames = reference_tensor("frames");
    let (t, h, w, _) = frames.dims4().unwrap();
    let mut rng = Rng(1);
    let mut pixels = Vec::new();
    for i in 0..t {
        let rgb: Vec<u8> = frames
            .get(i)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for format in ALL_FORMATS {
            let frame = FrameLayout::from_rgb(&rgb, w, h, format, &mut rng);
            let yuv = YuvToRgb::default_for_height(h);
            let out = check_frame(
                &pre,
                &frame,
                yuv,
                &format!("fixture frame {i} as {format:?}"),
            );
            if format == PixelFormat::Rgb {
                pixels.extend(out);
            }
        }
    }
    let (oh, ow) = pre.output_size(w, h);
    let ours = Tensor::from_vec(pixels, (t, 3, oh, ow), &Device::Cpu).unwrap();
    assert_close(
        "pixel_values (twin)",
        &ours,
        &reference_tensor("pixel_values"),
        1e-5,
    );
}

#[test]
fn preprocess_twin_matches_model_on_random_frames() {
    let mut rng = Rng(0x5eed);
    // Odd sizes around the interesting cases: tiny, upscaled, downscaled, portrait, landscape.
    let sizes = [
        (1, 1),
        (2, 3),
        (5, 3),
        (17, 9),
        (9, 31),
        (33, 47),
        (61, 20),
        (101, 67),
        (225, 223),
        (331, 143),
    ];
    let mut checked = 0;
    for (name, pre) in configs() {
        for &(w, h) in &sizes {
            // The 224 config upscales small frames to 224+ rows: keep the slow debug build quick.
            if name == "clip_224" && w.min(h) < 9 {
                continue;
            }
            for format in ALL_FORMATS {
                let frame = FrameLayout::random(format, w, h, &mut rng);
                let yuv = random_yuv(&mut rng);
                check_frame(
                    &pre,
                    &frame,
                    yuv,
                    &format!("{name}: {w}x{h} {format:?} {yuv:?}"),
                );
                checked += 1;
            }
        }
    }
    eprintln!("{checked} random frames bit-identical to the model");
}

#[test]
fn preprocess_twin_handles_1080p_nv12() {
    let mut rng = Rng(1080);
    let pre = ClipPreprocess::clip_224();
    let frame = FrameLayout::random(PixelFormat::Nv12, 1920, 1080, &mut rng);
    let yuv = YuvToRgb::default_for_height(1080);
    let params = kernel_params(&pre, &frame, yuv);
    assert_eq!(params.resized_size(), (398, 224));
    assert_eq!((params.crop_left, params.crop_top), (87, 0));
    check_frame(&pre, &frame, yuv, "1920x1080 NV12");
}

#[test]
fn preprocess_params_are_validated() {
    let mut rng = Rng(7);
    let pre = ClipPreprocess::clip_224();
    let frame = FrameLayout::random(PixelFormat::I420, 31, 17, &mut rng);
    let good = kernel_params(&pre, &frame, YuvToRgb::default_for_height(17));
    assert!(twin::preprocess(&good, &frame.data).is_ok());

    let short = &frame.data[..good.used_bytes().unwrap().end - 1];
    assert!(
        twin::preprocess(&good, short).is_err(),
        "buffer one byte short"
    );

    let mut p = good.clone();
    p.planes[1].stride = 15; // a chroma row is 16 bytes
    assert!(
        twin::preprocess(&p, &frame.data).is_err(),
        "stride below a row"
    );

    let mut p = good.clone();
    p.planes.pop();
    assert!(twin::preprocess(&p, &frame.data).is_err(), "missing plane");

    let mut p = good.clone();
    p.horizontal.starts[5] = 30; // 30 + count > 31
    assert!(
        twin::preprocess(&p, &frame.data).is_err(),
        "taps beyond the row"
    );

    let mut p = good.clone();
    p.vertical = llamavid_kernels::AxisTaps::for_resize(18, p.vertical.out_size());
    assert!(
        twin::preprocess(&p, &frame.data).is_err(),
        "taps for another height"
    );

    let mut p = good;
    p.out_width = 0;
    assert!(twin::preprocess(&p, &frame.data).is_err(), "empty output");
}

// ---------------------------------------------------------------------------------------------
// Compression twin (CPU)
// ---------------------------------------------------------------------------------------------

/// The model's candle-op path: (attention, context_pooled, content_pooled).
fn model_compress(tq: &Tensor, keys: &Tensor, patches: &Tensor) -> (Tensor, Tensor, Tensor) {
    let tg = model().token_generator();
    let attention = tg.context_attention(tq, keys).unwrap();
    let context = tg.context_pooled(&attention, patches).unwrap();
    let content = tg.content_pooled(patches).unwrap().squeeze(1).unwrap();
    (attention, context, content)
}

fn fixture_scale() -> f64 {
    // The token generator's scale: the vision width's inverse square root.
    compress::default_scale(reference_tensor("text_queries").dim(2).unwrap())
}

fn random_tensor(rng: &mut Rng, shape: (usize, usize, usize), amplitude: f32) -> Tensor {
    let n = shape.0 * shape.1 * shape.2;
    let v: Vec<f32> = (0..n).map(|_| rng.signed() * amplitude).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn twin_attention(tq: &Tensor, keys: &Tensor, scale: f64) -> Tensor {
    let s = CompressShape::of(tq, keys, keys).unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let a = compress::cpu::attention(&flat(tq), &flat(keys), s, scale as f32);
    Tensor::from_vec(a, (s.batch, s.queries, s.patches), &Device::Cpu).unwrap()
}

#[test]
fn compress_twin_matches_model_on_fixture() {
    assert_eq!(
        model().token_generator().content_tokens_per_frame(),
        1,
        "mean pooling"
    );
    let tq = reference_tensor("text_queries");
    let keys = reference_tensor("context_keys");
    let patches = model()
        .token_generator()
        .patches(&reference_tensor("vision_features"))
        .unwrap();
    let (attention, context, content) = model_compress(&tq, &keys, &patches);

    let pooled = llamavid_kernels::compress(&tq, &keys, &patches).unwrap();
    assert_close(
        "context_pooled (twin vs model)",
        &pooled.context,
        &context,
        1e-5,
    );
    assert_close(
        "content_pooled (twin vs model)",
        &pooled.content,
        &content,
        1e-5,
    );
    assert_close(
        "attention (twin vs model)",
        &twin_attention(&tq, &keys, fixture_scale()),
        &attention,
        1e-5,
    );
    // And the reference implementation's own numbers.
    assert_close(
        "context_pooled (twin vs reference)",
        &pooled.context,
        &reference_tensor("context_pooled"),
        STAGE_TOL,
    );
    assert_close(
        "content_pooled (twin vs reference)",
        &pooled.content,
        &reference_tensor("content_pooled"),
        STAGE_TOL,
    );
}

#[test]
fn compress_twin_matches_model_on_random_inputs() {
    let mut rng = Rng(42);
    let scale = fixture_scale();
    // (B, Q, N, W): odd sizes; N > 256 and W > 32 exercise every partial-sum lane and thread.
    for (b, q, n, w) in [
        (3, 7, 17, 33),
        (1, 1, 1, 1),
        (2, 5, 300, 70),
        (4, 32, 257, 129),
    ] {
        let tq = random_tensor(&mut rng, (b, q, w), 3.0);
        let keys = random_tensor(&mut rng, (b, n, w), 3.0);
        let patches = random_tensor(&mut rng, (b, n, w), 5.0);
        let (attention, context, content) = model_compress(&tq, &keys, &patches);
        let pooled = llamavid_kernels::compress_with_scale(&tq, &keys, &patches, scale).unwrap();
        let what = format!("B={b} Q={q} N={n} W={w}");
        assert_close(&format!("{what} context"), &pooled.context, &context, 1e-5);
        assert_close(&format!("{what} content"), &pooled.content, &content, 1e-5);
        assert_close(
            &format!("{what} attention"),
            &twin_attention(&tq, &keys, scale),
            &attention,
            1e-5,
        );
    }
}

#[test]
fn compress_twin_takes_strided_and_half_inputs() {
    let mut rng = Rng(9);
    let scale = fixture_scale();
    let (b, q, n, w) = (3, 7, 17, 33);
    // Non-contiguous views: (B, W, Q) transposed to (B, Q, W).
    let tq = random_tensor(&mut rng, (b, w, q), 2.0)
        .transpose(1, 2)
        .unwrap();
    let keys = random_tensor(&mut rng, (b, w, n), 2.0)
        .transpose(1, 2)
        .unwrap();
    let patches = random_tensor(&mut rng, (b, n, w), 2.0);
    assert!(!tq.is_contiguous());
    let f32_out = llamavid_kernels::compress_with_scale(&tq, &keys, &patches, scale).unwrap();
    let (_, context, content) = model_compress(&tq, &keys, &patches);
    assert_close("strided context", &f32_out.context, &context, 1e-5);
    assert_close("strided content", &f32_out.content, &content, 1e-5);

    // Loose: the inputs themselves are rounded to half precision here.
    for (dtype, tol) in [(DType::F16, 2e-3), (DType::BF16, 2e-2)] {
        let cast = |t: &Tensor| t.to_dtype(dtype).unwrap();
        let out =
            llamavid_kernels::compress_with_scale(&cast(&tq), &cast(&keys), &cast(&patches), scale)
                .unwrap();
        assert_eq!(out.context.dtype(), dtype);
        assert_eq!(out.content.dtype(), dtype);
        assert_close(&format!("{dtype:?} context"), &out.context, &context, tol);
        assert_close(&format!("{dtype:?} content"), &out.content, &content, tol);
    }

    let bad = llamavid_kernels::compress(&tq, &keys, &patches.narrow(1, 0, n - 1).unwrap());
    assert!(bad.is_err(), "mismatched patch count is refused");
}

// ---------------------------------------------------------------------------------------------
// Batching on any device (issue 10): used by the GPU checks below; written outside the `cuda`
// module so that every build type-checks them.
// ---------------------------------------------------------------------------------------------

/// Sequences of `embeds` with max_new_tokens 1.., advanced together with `LlamaVid::step`
/// until all finish: the greedy ids of each must equal its generation alone.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn assert_batched_generation_matches_alone(m: &LlamaVid, embeds: &Tensor, batch: usize) {
    use gstllamavid::model::{Cancel, CaptionSequence, GenerationParams};
    let params = |i: usize| GenerationParams {
        max_new_tokens: 4 + 3 * i,
        ..GenerationParams::default()
    };
    let len = embeds.dim(1).unwrap();
    // Different lengths: prefixes of the prompt and video.
    let input = |i: usize| embeds.narrow(1, 0, len - (i % len.min(4))).unwrap();
    let mut sequences: Vec<CaptionSequence> = (0..batch)
        .map(|i| m.start_sequence(&input(i), &params(i)).unwrap())
        .collect();
    while sequences.iter().any(|s| !s.is_finished()) {
        let mut all: Vec<&mut CaptionSequence> = sequences.iter_mut().collect();
        m.step(&mut all, Cancel::NEVER).unwrap();
    }
    for (i, seq) in sequences.iter().enumerate() {
        let alone = m.generate(&input(i), &params(i), false, None).unwrap();
        assert_eq!(
            seq.token_ids(),
            alone.token_ids,
            "sequence {i} of a batch of {batch} against itself alone"
        );
    }
}

/// Per-frame encode time of `b` frames at once and the time of one decode step of `b`
/// sequences in one forward, for each `b` of `sizes`, on `m`'s device: (stage, time, rate)
/// rows for the timing table.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn batch_timings(m: &LlamaVid, embeds: &Tensor, sizes: &[usize]) -> Vec<(String, String, String)> {
    use gstllamavid::model::{Cancel, CaptionSequence, GenerationParams};
    use std::time::{Duration, Instant};
    let dev = m.device().clone();
    let timed = |iters: usize, f: &mut dyn FnMut()| -> Duration {
        f();
        dev.synchronize().unwrap();
        let start = Instant::now();
        for _ in 0..iters {
            f();
        }
        dev.synchronize().unwrap();
        start.elapsed() / iters as u32
    };
    let ms = |d: Duration| format!("{:.3} ms", d.as_secs_f64() * 1e3);
    let prompt = m.prompt("What is happening in this video?").unwrap();
    let size = m.vision().config().image_size();
    let dtype = m.dtype();
    let mut rows = Vec::new();
    for &b in sizes {
        let pixels = Tensor::randn(0f32, 1f32, (b, 3, size, size), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let per_frame = timed(3, &mut || {
            m.encode_pixels(&pixels, &prompt).unwrap();
        }) / b as u32;
        rows.push((
            format!("encode batch {b}, per frame ({dtype:?})"),
            ms(per_frame),
            format!("{:.0} frames/s", 1.0 / per_frame.as_secs_f64()),
        ));
        // b sequences prefilled together, then decode steps of b rows (EOS ends a sequence
        // early only by chance; the rows actually run are reported).
        let steps = 8;
        let params = GenerationParams {
            max_new_tokens: steps + 2,
            ..GenerationParams::default()
        };
        let mut sequences: Vec<CaptionSequence> = (0..b)
            .map(|_| m.start_sequence(embeds, &params).unwrap())
            .collect();
        let mut all: Vec<&mut CaptionSequence> = sequences.iter_mut().collect();
        m.step(&mut all, Cancel::NEVER).unwrap();
        let running = all.iter().filter(|s| !s.is_finished()).count();
        let step = timed(steps, &mut || {
            m.step(&mut all, Cancel::NEVER).unwrap();
        });
        rows.push((
            format!("decode step, {running} of {b} sequences at once ({dtype:?})"),
            ms(step),
            format!("{:.0} tokens/s", running as f64 / step.as_secs_f64()),
        ));
    }
    rows
}

// ---------------------------------------------------------------------------------------------
// GPU checks (kernels/gpu-check.sh): `cargo test --features cuda -- --ignored gpu_`
// ---------------------------------------------------------------------------------------------

#[cfg(feature = "cuda")]
mod gpu {
    use std::time::{Duration, Instant};

    use candle_core::{DType, Device, IndexOp, Tensor};
    use gstllamavid::model::llama::LogitsFor;
    use gstllamavid::model::preprocess::{ClipPreprocess, PixelFormat, YuvToRgb};
    use gstllamavid::model::{GenerationParams, LlamaVid, LoadOptions};
    use llamavid_kernels::compress::{self, CompressShape};
    use llamavid_kernels::preprocess::cpu as twin;
    use llamavid_kernels::PreprocessPlan;

    use super::common::{assert_close, model_dir, END_TO_END_TOL};
    use super::*;

    fn cuda() -> Device {
        Device::new_cuda(0).expect("a CUDA device (this test needs a GPU and its driver)")
    }

    fn sync(d: &Device) {
        d.synchronize().unwrap();
    }

    /// Kernel against twin for one frame: uint8 bytes equal, f32 bits equal, f16/bf16 equal to
    /// the twin's f32 rounded by candle.
    fn check_kernel_frame(
        dev: &Device,
        pre: &ClipPreprocess,
        frame: &FrameLayout,
        yuv: YuvToRgb,
        what: &str,
    ) {
        let params = kernel_params(pre, frame, yuv);
        let plan = PreprocessPlan::new(dev.as_cuda_device().unwrap(), params.clone()).unwrap();
        let want_u8 = twin::resample_u8(&params, &frame.data).unwrap();
        let got_u8: Vec<u8> = plan
            .run(&frame.data, DType::U8)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            got_u8 == want_u8,
            "{what}: kernel uint8 stage differs from the twin"
        );
        let want = twin::preprocess(&params, &frame.data).unwrap();
        let got: Vec<f32> = plan
            .run(&frame.data, DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            bits(&got) == bits(&want),
            "{what}: kernel f32 output differs from the twin"
        );
        // And the model's CPU path, directly.
        let view = frame.view(yuv);
        let model = pre.pixels(&view).unwrap();
        assert!(
            bits(&got) == bits(&model),
            "{what}: kernel differs from ClipPreprocess::pixels"
        );
        // Separate plane slices, as a mapped GstVideoFrame hands them over.
        let planes: Vec<f32> = plan
            .run_planes(&view.planes, DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            bits(&planes) == bits(&want),
            "{what}: run_planes differs from the twin"
        );
        let want_t =
            Tensor::from_vec(want, (3, params.out_height, params.out_width), &Device::Cpu).unwrap();
        for dtype in [DType::F16, DType::BF16] {
            let got = plan
                .run(&frame.data, dtype)
                .unwrap()
                .to_device(&Device::Cpu)
                .unwrap();
            let want = want_t.to_dtype(dtype).unwrap();
            let eq = got
                .eq(&want)
                .unwrap()
                .to_dtype(DType::U32)
                .unwrap()
                .sum_all()
                .unwrap();
            assert_eq!(
                eq.to_scalar::<u32>().unwrap() as usize,
                want_t.elem_count(),
                "{what}: kernel {dtype:?} output differs from the twin rounded"
            );
        }
    }

    #[test]
    #[ignore = "needs a GPU: kernels/gpu-check.sh"]
    fn gpu_preprocess_kernel_matches_twin() {
        let dev = cuda();
        let pre = model().preprocessing().clone();
        let frames = reference_tensor("frames");
        let (t, h, w, _) = frames.dims4().unwrap();
        let mut rng = Rng(11);
        for i in 0..t {
            let rgb: Vec<u8> = frames
                .i(i)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for format in ALL_FORMATS {
                let frame = FrameLayout::from_rgb(&rgb, w, h, format, &mut rng);
                check_kernel_frame(
                    &dev,
                    &pre,
                    &frame,
                    YuvToRgb::default_for_height(h),
                    &format!("fixture {i} {format:?}"),
                );
            }
        }
        let sizes = [
            (1, 1),
            (5, 3),
            (17, 9),
            (33, 47),
            (101, 67),
            (331, 143),
            (1920, 1080),
            (719, 1281),
        ];
        let mut n = 0;
        for (name, pre) in configs() {
            for &(w, h) in &sizes {
                for format in ALL_FORMATS {
                    let frame = FrameLayout::random(format, w, h, &mut rng);
                    let yuv = random_yuv(&mut rng);
                    check_kernel_frame(
                        &dev,
                        &pre,
                        &frame,
                        yuv,
                        &format!("{name}: {w}x{h} {format:?}"),
                    );
                    n += 1;
                }
            }
        }
        // A batch equals its frames one by one.
        let pre = ClipPreprocess::clip_224();
        let a = FrameLayout::random(PixelFormat::Nv12, 641, 359, &mut rng);
        let mut b = FrameLayout::random(PixelFormat::Nv12, 641, 359, &mut rng);
        b.planes = a.planes.clone();
        b.data.resize(a.data.len(), 7);
        let params = kernel_params(&pre, &a, YuvToRgb::default_for_height(359));
        let plan = PreprocessPlan::new(dev.as_cuda_device().unwrap(), params).unwrap();
        let batch = plan.run_batch(&[&a.data, &b.data], DType::F32).unwrap();
        for (i, f) in [&a, &b].iter().enumerate() {
            let one = plan.run(&f.data, DType::F32).unwrap();
            let d = (batch.i(i).unwrap() - one)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "batch frame {i}");
        }
        eprintln!(
            "preprocess kernel: fixture frames and {n} random frames bit-identical to the twin"
        );
    }

    #[test]
    #[ignore = "needs a GPU: kernels/gpu-check.sh"]
    fn gpu_compress_kernel_matches_twin_and_candle() {
        let dev = cuda();
        let mut rng = Rng(77);
        let tg = model().token_generator();
        let fixture = (
            reference_tensor("text_queries"),
            reference_tensor("context_keys"),
            tg.patches(&reference_tensor("vision_features")).unwrap(),
        );
        let mut cases = vec![("fixture".to_string(), fixture, fixture_scale())];
        for (b, q, n, w) in [
            (3, 7, 17, 33),
            (1, 1, 1, 1),
            (2, 5, 300, 70),
            (4, 32, 256, 1408),
            (1, 32, 576, 1408),
        ] {
            let t = (
                random_tensor(&mut rng, (b, q, w), 1.0),
                random_tensor(&mut rng, (b, n, w), 1.0),
                random_tensor(&mut rng, (b, n, w), 3.0),
            );
            cases.push((
                format!("B={b} Q={q} N={n} W={w}"),
                t,
                compress::default_scale(w),
            ));
        }
        for (what, (tq, keys, patches), scale) in cases {
            // Twin (CPU) and kernel (GPU) on the same f32 inputs.
            let cpu = llamavid_kernels::compress_with_scale(&tq, &keys, &patches, scale).unwrap();
            let (gtq, gk, gv) = (
                tq.to_device(&dev).unwrap(),
                keys.to_device(&dev).unwrap(),
                patches.to_device(&dev).unwrap(),
            );
            let gpu = llamavid_kernels::compress_with_scale(&gtq, &gk, &gv, scale).unwrap();
            assert_close(
                &format!("{what}: context kernel vs twin"),
                &gpu.context,
                &cpu.context,
                1e-5,
            );
            assert_close(
                &format!("{what}: content kernel vs twin"),
                &gpu.content,
                &cpu.content,
                1e-5,
            );
            let s = CompressShape::of(&tq, &keys, &patches).unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let a_cpu = compress::cpu::attention(&flat(&tq), &flat(&keys), s, scale as f32);
            let a_cpu =
                Tensor::from_vec(a_cpu, (s.batch, s.queries, s.patches), &Device::Cpu).unwrap();
            let a_gpu =
                compress::cuda::attention(dev.as_cuda_device().unwrap(), &gtq, &gk, scale as f32)
                    .unwrap();
            assert_close(
                &format!("{what}: attention kernel vs twin"),
                &a_gpu,
                &a_cpu,
                1e-5,
            );
            // The model's candle-op path on the GPU (f32).
            let scores = (gtq.matmul(&gk.t().unwrap()).unwrap() * scale).unwrap();
            let attention = candle_nn::ops::softmax_last_dim(&scores).unwrap();
            let context = attention.matmul(&gv).unwrap().mean(1).unwrap();
            let content = gv.mean(1).unwrap();
            assert_close(
                &format!("{what}: context kernel vs candle"),
                &gpu.context,
                &context,
                1e-5,
            );
            assert_close(
                &format!("{what}: content kernel vs candle"),
                &gpu.content,
                &content,
                1e-5,
            );
            // Half precision: kernel vs twin on the same rounded inputs.
            for (dtype, tol) in [(DType::F16, 1e-3), (DType::BF16, 8e-3)] {
                let c = |t: &Tensor| t.to_dtype(dtype).unwrap();
                let cpu =
                    llamavid_kernels::compress_with_scale(&c(&tq), &c(&keys), &c(&patches), scale)
                        .unwrap();
                let gpu = llamavid_kernels::compress_with_scale(&c(&gtq), &c(&gk), &c(&gv), scale)
                    .unwrap();
                assert_close(
                    &format!("{what}: {dtype:?} context"),
                    &gpu.context,
                    &cpu.context,
                    tol,
                );
                assert_close(
                    &format!("{what}: {dtype:?} content"),
                    &gpu.content,
                    &cpu.content,
                    tol,
                );
            }
        }
    }

    fn load(device: Device, dtype: DType) -> LlamaVid {
        load_from(model_dir(), device, dtype)
    }

    fn load_from(dir: std::path::PathBuf, device: Device, dtype: DType) -> LlamaVid {
        let mut options = LoadOptions::new(dir);
        options.device = device;
        options.dtype = dtype;
        LlamaVid::load(&options).expect("model loads")
    }

    fn question() -> String {
        super::common::prompt_json()["question"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn greedy(n: usize) -> GenerationParams {
        GenerationParams {
            max_new_tokens: n,
            ..GenerationParams::default()
        }
    }

    #[test]
    #[ignore = "needs a GPU: kernels/gpu-check.sh"]
    fn gpu_model_matches_cpu() {
        let dev = cuda();
        let gpu = load(dev.clone(), DType::F32);
        let cpu = model();
        let pixels = reference_tensor("pixel_values");
        let prompt_gpu = gpu.prompt(&question()).unwrap();
        let prompt_cpu = cpu.prompt(&question()).unwrap();
        let tokens_gpu = gpu
            .encode_pixels(&pixels.to_device(&dev).unwrap(), &prompt_gpu)
            .unwrap();
        let tokens_cpu = cpu.encode_pixels(&pixels, &prompt_cpu).unwrap();
        assert_close(
            "video tokens GPU vs CPU (f32)",
            &tokens_gpu,
            &tokens_cpu,
            END_TO_END_TOL,
        );
        let n = tokens_cpu.dim(0).unwrap() * tokens_cpu.dim(1).unwrap();
        assert_close(
            "video tokens GPU vs reference",
            &tokens_gpu.reshape((n, ())).unwrap(),
            &reference_tensor("video_tokens"),
            END_TO_END_TOL,
        );
        let expected: Vec<u32> = reference_tensor("generated_ids")
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|v| v as u32)
            .collect();
        let video = tokens_gpu.reshape((n, ())).unwrap();
        let embeds = gpu.input_embeddings(&prompt_gpu, &video).unwrap();
        let generation = gpu
            .generate(&embeds, &greedy(expected.len()), false, None)
            .unwrap();
        let cpu_embeds = cpu
            .input_embeddings(&prompt_cpu, &tokens_cpu.reshape((n, ())).unwrap())
            .unwrap();
        let cpu_generation = cpu
            .generate(&cpu_embeds, &greedy(expected.len()), false, None)
            .unwrap();
        assert_eq!(
            generation.token_ids, cpu_generation.token_ids,
            "greedy ids GPU vs CPU"
        );
        assert_eq!(
            generation.token_ids, expected,
            "greedy ids GPU vs reference"
        );
        // Sequences of different lengths advanced together on the GPU (candle's layers, one
        // forward per step) give the ids each gives alone.
        assert_batched_generation_matches_alone(&gpu, &embeds, 8);

        // The fused compression inside the model's path on the GPU (the wiring the element
        // will use): same frame tokens as the candle ops.
        let tg = gpu.token_generator();
        let features = gpu
            .vision()
            .forward(&pixels.to_device(&dev).unwrap())
            .unwrap();
        let visual = tg.qformer_visual_input(&features).unwrap();
        let tq = tg
            .text_queries(&tg.qformer_output(&prompt_gpu.guidance, &visual).unwrap())
            .unwrap();
        let patches = tg.patches(&features).unwrap();
        let keys = tg.context_keys(&patches).unwrap();
        let pooled = llamavid_kernels::compress(&tq, &keys, &patches).unwrap();
        let context = tg.context_tokens(&pooled.context).unwrap();
        let content = tg
            .content_tokens(&pooled.content.unsqueeze(1).unwrap())
            .unwrap();
        let fused = Tensor::cat(&[&context.unsqueeze(1).unwrap(), &content], 1).unwrap();
        assert_close(
            "frame tokens with the fused kernel vs candle ops (GPU)",
            &fused,
            &tokens_gpu,
            1e-5,
        );

        // Preprocessing kernel feeding the model: same pixels as the reference frames give.
        let frames = reference_tensor("frames");
        let (t, h, w, _) = frames.dims4().unwrap();
        let pre = gpu.preprocessing().clone();
        let mut rng = Rng(3);
        let layouts: Vec<FrameLayout> = (0..t)
            .map(|i| {
                let rgb: Vec<u8> = frames
                    .i(i)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                FrameLayout::from_rgb(&rgb, w, h, PixelFormat::Rgb, &mut rng)
            })
            .collect();
        let gpu_pixels: Vec<Tensor> = layouts
            .iter()
            .map(|f| {
                let params = kernel_params(&pre, f, YuvToRgb::default_for_height(h));
                PreprocessPlan::new(dev.as_cuda_device().unwrap(), params)
                    .unwrap()
                    .run(&f.data, DType::F32)
                    .unwrap()
            })
            .collect();
        let gpu_pixels = Tensor::stack(&gpu_pixels, 0).unwrap();
        assert_close(
            "pixel_values from the kernel vs reference",
            &gpu_pixels,
            &pixels,
            1e-5,
        );
    }

    fn time<R>(iters: usize, dev: &Device, mut f: impl FnMut() -> R) -> Duration {
        let _ = f();
        sync(dev);
        let start = Instant::now();
        for _ in 0..iters {
            let _ = f();
        }
        sync(dev);
        start.elapsed() / iters as u32
    }

    fn ms(d: Duration) -> String {
        format!("{:.3} ms", d.as_secs_f64() * 1e3)
    }

    #[test]
    #[ignore = "needs a GPU: kernels/gpu-check.sh"]
    fn gpu_timings() {
        let dev = cuda();
        let cuda_dev = dev.as_cuda_device().unwrap().clone();
        let mut rows: Vec<(String, String, String)> = Vec::new();

        // Preprocessing at 1080p NV12 -> 224 (upload of the raw frame included).
        let mut rng = Rng(1080);
        let pre = ClipPreprocess::clip_224();
        let frame = FrameLayout::random(PixelFormat::Nv12, 1920, 1080, &mut rng);
        let yuv = YuvToRgb::default_for_height(1080);
        let params = kernel_params(&pre, &frame, yuv);
        let plan = PreprocessPlan::new(&cuda_dev, params.clone()).unwrap();
        for dtype in [DType::F32, DType::F16] {
            let t = time(200, &dev, || plan.run(&frame.data, dtype).unwrap());
            rows.push((
                format!("preprocess kernel 1920x1080 NV12 -> 3x224x224 {dtype:?}"),
                ms(t),
                format!("{:.0} fps (upload included)", 1.0 / t.as_secs_f64()),
            ));
        }
        let batch: Vec<&[u8]> = (0..8).map(|_| frame.data.as_slice()).collect();
        let t = time(25, &dev, || plan.run_batch(&batch, DType::F16).unwrap()) / 8;
        rows.push((
            "preprocess kernel, batches of 8".into(),
            ms(t),
            format!("{:.0} fps", 1.0 / t.as_secs_f64()),
        ));
        let view = frame.view(yuv);
        let start = Instant::now();
        let _ = pre.pixels(&view).unwrap();
        let cpu_t = start.elapsed();
        rows.push((
            "preprocess CPU (model path, same frame)".into(),
            ms(cpu_t),
            format!("{:.1} fps", 1.0 / cpu_t.as_secs_f64()),
        ));

        // Compression at the real model's sizes: kernel vs candle ops.
        for dtype in [DType::F32, DType::F16] {
            let (b, q, n, w) = (1, 32, 256, 1408);
            let mk = |s, a| {
                random_tensor(&mut Rng(5), s, a)
                    .to_dtype(dtype)
                    .unwrap()
                    .to_device(&dev)
                    .unwrap()
            };
            let (tq, k, v) = (mk((b, q, w), 1.0), mk((b, n, w), 1.0), mk((b, n, w), 1.0));
            let scale = compress::default_scale(w);
            let tk = time(200, &dev, || {
                llamavid_kernels::compress_with_scale(&tq, &k, &v, scale).unwrap()
            });
            let tc = time(200, &dev, || {
                let s = (tq.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
                let a = candle_nn::ops::softmax_last_dim(&s).unwrap();
                (a.matmul(&v).unwrap().mean(1).unwrap(), v.mean(1).unwrap())
            });
            rows.push((
                format!("compress B=1 Q=32 N=256 W=1408 {dtype:?}: kernel / candle ops"),
                format!("{} / {}", ms(tk), ms(tc)),
                String::new(),
            ));
        }

        // The model on the GPU: LLAMAVID_BENCH_MODEL (a real checkpoint directory) when set,
        // else the fixture's; LLAMAVID_BENCH_FRAMES frames (default 8) of random pixels.
        let model_path = std::env::var_os("LLAMAVID_BENCH_MODEL")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(model_dir);
        let frames: usize = std::env::var("LLAMAVID_BENCH_FRAMES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(8);
        for dtype in [DType::F32, DType::F16] {
            let m = load_from(model_path.clone(), dev.clone(), dtype);
            let prompt = m.prompt(&question()).unwrap();
            let (oh, ow) = m.preprocessing().output_size(1920, 1080);
            let pixels = Tensor::randn(0f32, 1f32, (frames, 3, oh, ow), &dev).unwrap();
            let one = pixels.narrow(0, 0, 1).unwrap();
            let t = time(20, &dev, || m.encode_pixels(&one, &prompt).unwrap());
            rows.push((
                format!("encode 1 frame ({dtype:?})"),
                ms(t),
                format!("{:.0} frames/s", 1.0 / t.as_secs_f64()),
            ));
            let t = time(5, &dev, || m.encode_pixels(&pixels, &prompt).unwrap()) / frames as u32;
            rows.push((
                format!("encode {frames} frames at once, per frame ({dtype:?})"),
                ms(t),
                format!("{:.0} frames/s", 1.0 / t.as_secs_f64()),
            ));
            let tokens = m.encode_pixels(&pixels, &prompt).unwrap();
            let n = tokens.dim(0).unwrap() * tokens.dim(1).unwrap();
            let embeds = m
                .input_embeddings(&prompt, &tokens.reshape((n, ())).unwrap())
                .unwrap();
            let len = embeds.dim(1).unwrap();
            let prefill = time(10, &dev, || {
                let mut cache = m.llm().new_cache(len + 1);
                m.llm()
                    .forward(&embeds, &mut cache, LogitsFor::LastPosition, None)
                    .unwrap()
            });
            rows.push((
                format!("prefill {len} positions ({dtype:?})"),
                ms(prefill),
                String::new(),
            ));
            let start = Instant::now();
            let generation = m.generate(&embeds, &greedy(32), false, None).unwrap();
            sync(&dev);
            let total = start.elapsed();
            // Forward passes after the prefill: one per token but the last, plus the one that
            // produced EOS.
            let tokens_out = generation.token_ids.len();
            let steps = (tokens_out + usize::from(generation.stopped_at_eos))
                .saturating_sub(1)
                .max(1);
            let per_token = total.saturating_sub(prefill) / steps as u32;
            rows.push((
                format!("decode per token ({dtype:?}, {tokens_out} tokens)"),
                ms(per_token),
                format!("{:.0} tokens/s", 1.0 / per_token.as_secs_f64().max(1e-9)),
            ));
            // Issue 10: encode and decode at batch 1, 8, 32 and 64.
            rows.extend(batch_timings(&m, &embeds, &[1, 8, 32, 64]));
        }

        let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        println!(
            "\nllamavid GPU timings ({:?}, model {})",
            dev.location(),
            model_path.display()
        );
        println!("{:width$} | {:>22} | rate", "stage", "time");
        println!(
            "{}-+-{}-+-{}",
            "-".repeat(width),
            "-".repeat(22),
            "-".repeat(28)
        );
        for (stage, t, rate) in rows {
            println!("{stage:width$} | {t:>22} | {rate}");
        }
    }
}
