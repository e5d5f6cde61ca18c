//! Frame preprocessing: colour conversion, Pillow-exact resize, CLIP crop/normalise, and the
//! fixture's recorded `pixel_values`.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use gstllamavid::model::preprocess::{
    resize_bicubic, resize_bicubic_window, AxisTaps, ClipPreprocess, FrameView, Normalize,
    PixelFormat, ResizeTarget, RgbImage, YuvCoefficients, YuvMatrix, YuvRange, YuvToRgb, CLIP_MEAN,
    CLIP_STD, PRECISION_BITS,
};
use gstllamavid::model::ModelError;

/// Deterministic bytes, the same generator as the Python script that produces the Pillow hashes
/// below (tests/scripts/pillow_resize_hashes.py) (`s = (s * 1103515245 + 12345) & 0x7fffffff; byte = (s >> 16) & 255`).
fn lcg_bytes(seed: u32, n: usize) -> Vec<u8> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(1_103_515_245).wrapping_add(12_345) & 0x7fff_ffff;
            (s >> 16) as u8
        })
        .collect()
}

fn lcg_image(seed: u32, width: usize, height: usize) -> RgbImage {
    RgbImage::new(width, height, lcg_bytes(seed, width * height * 3)).unwrap()
}

/// FNV-1a, 64 bit.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

// ---------------------------------------------------------------------------------------------
// (a) The fixture

fn fixture_processor() -> PathBuf {
    let dir = common::fixture_dir().join("llamavid/processor");
    let mut configs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path().join("preprocessor_config.json")))
        .filter(|p| p.is_file())
        .collect();
    configs.sort();
    configs
        .into_iter()
        .next()
        .expect("fixture has a processor config")
}

/// The recorded frames as (T, H, W, 3) bytes.
fn fixture_frames() -> (Vec<u8>, [usize; 4]) {
    let frames = common::reference().remove("frames").expect("frames");
    let dims: [usize; 4] = frames.dims().try_into().expect("frames is 4-D");
    assert_eq!(dims[3], 3, "frames are RGB");
    let bytes = frames.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    (bytes, dims)
}

#[test]
fn fixture_pixel_values_match_reference() {
    let processor = ClipPreprocess::from_config_file(fixture_processor()).unwrap();
    let (bytes, [t, h, w, _]) = fixture_frames();
    let frame_len = h * w * 3;
    let views: Vec<FrameView> = bytes
        .chunks_exact(frame_len)
        .map(|f| FrameView::packed_rgb(w, h, f))
        .collect();
    assert_eq!(views.len(), t);

    let ours = processor.tensor(&views, &Device::Cpu).unwrap();
    let reference = common::reference().remove("pixel_values").unwrap();
    assert_eq!(ours.dims(), reference.dims());
    let err = common::max_abs(&(&ours - &reference.to_dtype(DType::F32).unwrap()).unwrap());
    eprintln!("pixel_values: max abs error {err:e}");
    assert!(err <= 1e-5, "pixel_values: max abs error {err:e} > 1e-5");
}

#[test]
fn fixture_pixels_independent_of_memory_layout() {
    // The same frames as BGRx with a padded stride must give bit-identical pixels.
    let processor = ClipPreprocess::from_config_file(fixture_processor()).unwrap();
    let (bytes, [_, h, w, _]) = fixture_frames();
    let frame = &bytes[..h * w * 3];
    let stride = w * 4 + 12;
    let mut bgrx = vec![0xAAu8; stride * h];
    for y in 0..h {
        for x in 0..w {
            let s = (y * w + x) * 3;
            let d = y * stride + x * 4;
            bgrx[d..d + 3].copy_from_slice(&[frame[s + 2], frame[s + 1], frame[s]]);
        }
    }
    let packed = processor
        .pixels(&FrameView::packed_rgb(w, h, frame))
        .unwrap();
    let padded = processor
        .pixels(&FrameView::new(
            PixelFormat::Bgrx,
            w,
            h,
            vec![&bgrx[..]],
            vec![stride],
        ))
        .unwrap();
    assert_eq!(packed, padded);
}

// ---------------------------------------------------------------------------------------------
// (b) Colour conversion

/// Repacks `rgb` into a packed format with `pad` extra bytes per row; `order` places R, G, B and
/// `extra` fills the fourth byte.
fn repack(
    rgb: &RgbImage,
    bpp: usize,
    order: [usize; 3],
    pad: usize,
    extra: u8,
) -> (Vec<u8>, usize) {
    let stride = rgb.width * bpp + pad;
    let mut out = vec![0x5Au8; stride * rgb.height];
    for y in 0..rgb.height {
        for x in 0..rgb.width {
            let p = rgb.pixel(x, y);
            let d = y * stride + x * bpp;
            if bpp == 4 {
                out[d + 3] = extra;
            }
            for c in 0..3 {
                out[d + order[c]] = p[c];
            }
        }
    }
    (out, stride)
}

#[test]
fn packed_formats_with_padded_strides_match_packed_rgb() {
    let rgb = lcg_image(7, 5, 3);
    let cases = [
        (PixelFormat::Rgb, 3, [0, 1, 2], 2),
        (PixelFormat::Rgbx, 4, [0, 1, 2], 3),
        (PixelFormat::Rgba, 4, [0, 1, 2], 0),
        (PixelFormat::Bgrx, 4, [2, 1, 0], 8),
        (PixelFormat::Bgra, 4, [2, 1, 0], 1),
    ];
    for (format, bpp, order, pad) in cases {
        let (bytes, stride) = repack(&rgb, bpp, order, pad, 0x11);
        // The last row need not carry its padding.
        let trimmed = &bytes[..bytes.len() - pad];
        let view = FrameView::new(format, 5, 3, vec![trimmed], vec![stride]);
        assert_eq!(view.to_rgb().unwrap(), rgb, "{format:?}");
    }
}

#[test]
fn packed_formats_swap_channels() {
    let px = [10u8, 20, 30, 40];
    let expect = |format, rgb: [u8; 3]| {
        let view = FrameView::new(format, 1, 1, vec![&px[..]], vec![4]);
        assert_eq!(view.to_rgb().unwrap().data, rgb, "{format:?}");
    };
    expect(PixelFormat::Rgbx, [10, 20, 30]);
    expect(PixelFormat::Rgba, [10, 20, 30]);
    expect(PixelFormat::Bgrx, [30, 20, 10]);
    expect(PixelFormat::Bgra, [30, 20, 10]);
    expect(PixelFormat::Rgb, [10, 20, 30]);
}

/// A 4:2:0 frame's samples: Y (w × h), U and V (⌈w/2⌉ × ⌈h/2⌉).
struct Yuv420 {
    w: usize,
    h: usize,
    y: Vec<u8>,
    u: Vec<u8>,
    v: Vec<u8>,
}

impl Yuv420 {
    fn random(seed: u32, w: usize, h: usize) -> Self {
        let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
        Yuv420 {
            w,
            h,
            y: lcg_bytes(seed, w * h),
            u: lcg_bytes(seed + 1, cw * ch),
            v: lcg_bytes(seed + 2, cw * ch),
        }
    }

    fn cw(&self) -> usize {
        self.w.div_ceil(2)
    }

    fn ch(&self) -> usize {
        self.h.div_ceil(2)
    }

    /// Copies `rows` rows of `row_len` bytes from `src` into a plane of the given stride.
    fn plane(src: &[u8], row_len: usize, rows: usize, stride: usize) -> Vec<u8> {
        let mut out = vec![0xEEu8; stride * rows];
        for r in 0..rows {
            out[r * stride..r * stride + row_len].copy_from_slice(&src[r * row_len..][..row_len]);
        }
        out
    }

    fn i420(&self, pad: usize) -> ([Vec<u8>; 3], [usize; 3]) {
        let strides = [self.w + pad, self.cw() + pad + 1, self.cw() + 2 * pad];
        (
            [
                Self::plane(&self.y, self.w, self.h, strides[0]),
                Self::plane(&self.u, self.cw(), self.ch(), strides[1]),
                Self::plane(&self.v, self.cw(), self.ch(), strides[2]),
            ],
            strides,
        )
    }

    fn nv12(&self, pad: usize) -> ([Vec<u8>; 2], [usize; 2]) {
        let uv: Vec<u8> = self
            .u
            .iter()
            .zip(&self.v)
            .flat_map(|(&u, &v)| [u, v])
            .collect();
        let strides = [self.w + pad, 2 * self.cw() + pad];
        (
            [
                Self::plane(&self.y, self.w, self.h, strides[0]),
                Self::plane(&uv, 2 * self.cw(), self.ch(), strides[1]),
            ],
            strides,
        )
    }
}

#[test]
fn i420_and_nv12_of_odd_sizes_decode_identically() {
    for (w, h) in [(7, 5), (1, 1), (2, 3), (13, 2)] {
        let yuv = Yuv420::random(40, w, h);
        let (i420, i420_strides) = yuv.i420(3);
        let (nv12, nv12_strides) = yuv.nv12(5);
        let a = FrameView::new(
            PixelFormat::I420,
            w,
            h,
            i420.iter().map(Vec::as_slice).collect(),
            i420_strides.to_vec(),
        )
        .to_rgb()
        .unwrap();
        let b = FrameView::new(
            PixelFormat::Nv12,
            w,
            h,
            nv12.iter().map(Vec::as_slice).collect(),
            nv12_strides.to_vec(),
        )
        .to_rgb()
        .unwrap();
        assert_eq!(a, b, "{w}x{h}");

        // Each pixel uses its own luma and the chroma of its 2×2 block.
        let coeffs = YuvToRgb::default_for_height(h).coefficients();
        for y in 0..h {
            for x in 0..w {
                let c = (y / 2) * yuv.cw() + x / 2;
                let expect = coeffs.convert(yuv.y[y * w + x], yuv.u[c], yuv.v[c]);
                assert_eq!(a.pixel(x, y), expect, "{w}x{h} at ({x},{y})");
            }
        }
    }
}

/// The real-valued conversion the fixed-point one approximates.
fn float_yuv(matrix: YuvMatrix, range: YuvRange, y: u8, u: u8, v: u8) -> [f64; 3] {
    let (kr, kb) = match matrix {
        YuvMatrix::Bt601 => (0.299, 0.114),
        YuvMatrix::Bt709 => (0.2126, 0.0722),
        YuvMatrix::Bt2020 => (0.2627, 0.0593),
    };
    let kg = 1.0 - kr - kb;
    let (yo, ys, cs) = match range {
        YuvRange::Limited => (16.0, 255.0 / 219.0, 255.0 / 224.0),
        YuvRange::Full => (0.0, 1.0, 1.0),
    };
    let yy = (f64::from(y) - yo) * ys;
    let pb = (f64::from(u) - 128.0) * cs;
    let pr = (f64::from(v) - 128.0) * cs;
    [
        yy + 2.0 * (1.0 - kr) * pr,
        yy - 2.0 * (1.0 - kb) * kb / kg * pb - 2.0 * (1.0 - kr) * kr / kg * pr,
        yy + 2.0 * (1.0 - kb) * pb,
    ]
}

fn assert_within_one(got: [u8; 3], want: [f64; 3], what: &str) {
    for c in 0..3 {
        let want = want[c].clamp(0.0, 255.0);
        assert!(
            (f64::from(got[c]) - want).abs() <= 1.0,
            "{what}: channel {c} is {} but the exact value is {want:.3}",
            got[c]
        );
    }
}

#[test]
fn yuv_fixed_point_tracks_exact_conversion() {
    for matrix in [YuvMatrix::Bt601, YuvMatrix::Bt709, YuvMatrix::Bt2020] {
        for range in [YuvRange::Limited, YuvRange::Full] {
            let coeffs = YuvCoefficients::new(matrix, range);
            for y in (0..=255u8).step_by(3) {
                for u in (0..=255u8).step_by(5) {
                    for v in (0..=255u8).step_by(5) {
                        // Rounding to nearest keeps us within half a step of the exact value;
                        // one step of slack covers the 16-bit coefficients.
                        assert_within_one(
                            coeffs.convert(y, u, v),
                            float_yuv(matrix, range, y, u, v),
                            &format!("{matrix:?} {range:?} ({y},{u},{v})"),
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn yuv_known_colours() {
    let bt601 = YuvCoefficients::new(YuvMatrix::Bt601, YuvRange::Limited);
    assert_eq!(bt601.convert(16, 128, 128), [0, 0, 0]);
    assert_eq!(bt601.convert(235, 128, 128), [255, 255, 255]);
    assert_within_one(bt601.convert(126, 128, 128), [128.0; 3], "BT.601 mid gray");
    // 100% red, green, blue in BT.601 limited range (rounded studio values).
    assert_within_one(bt601.convert(81, 90, 240), [255.0, 0.0, 0.0], "BT.601 red");
    assert_within_one(
        bt601.convert(145, 54, 34),
        [0.0, 255.0, 0.0],
        "BT.601 green",
    );
    assert_within_one(
        bt601.convert(41, 240, 110),
        [0.0, 0.0, 255.0],
        "BT.601 blue",
    );

    let bt709 = YuvCoefficients::new(YuvMatrix::Bt709, YuvRange::Limited);
    assert_eq!(bt709.convert(16, 128, 128), [0, 0, 0]);
    assert_eq!(bt709.convert(235, 128, 128), [255, 255, 255]);
    assert_within_one(bt709.convert(63, 102, 240), [255.0, 0.0, 0.0], "BT.709 red");

    let full = YuvCoefficients::new(YuvMatrix::Bt601, YuvRange::Full);
    assert_eq!(full.convert(0, 128, 128), [0, 0, 0]);
    assert_eq!(full.convert(255, 128, 128), [255, 255, 255]);
    assert_eq!(full.convert(77, 128, 128), [77, 77, 77]);

    // A whole I420 frame of one colour decodes to that colour everywhere.
    let (y, u, v) = ([81u8; 15], [90u8; 6], [240u8; 6]);
    let frame = FrameView::new(
        PixelFormat::I420,
        5,
        3,
        vec![&y[..], &u[..], &v[..]],
        vec![5, 3, 3],
    )
    .to_rgb()
    .unwrap();
    assert!(frame
        .data
        .chunks(3)
        .all(|p| p == bt601.convert(81, 90, 240)));
}

#[test]
fn yuv_matrix_defaults_follow_gstreamer() {
    assert_eq!(YuvMatrix::default_for_height(480), YuvMatrix::Bt601);
    assert_eq!(YuvMatrix::default_for_height(576), YuvMatrix::Bt601);
    assert_eq!(YuvMatrix::default_for_height(577), YuvMatrix::Bt709);
    assert_eq!(YuvMatrix::default_for_height(1080), YuvMatrix::Bt709);
    assert_eq!(YuvMatrix::default_for_height(2160), YuvMatrix::Bt2020);
    let frame = FrameView::new(PixelFormat::I420, 2, 720, vec![], vec![]);
    assert_eq!(frame.yuv.matrix, YuvMatrix::Bt709);
    assert_eq!(frame.yuv.range, YuvRange::Limited);
    let full = YuvToRgb {
        matrix: YuvMatrix::Bt601,
        range: YuvRange::Full,
    };
    assert_eq!(frame.with_yuv(full).yuv, full);
}

fn assert_invalid(view: FrameView, what: &str) {
    match view.to_rgb() {
        Err(ModelError::InvalidInput(msg)) => eprintln!("{what}: {msg}"),
        other => panic!("{what}: expected InvalidInput, got {other:?}"),
    }
}

#[test]
fn invalid_frames_are_errors_not_panics() {
    let buf = vec![0u8; 1000];
    let b = &buf[..];
    assert_invalid(
        FrameView::new(PixelFormat::Rgb, 5, 3, vec![&b[..44]], vec![15]),
        "RGB one byte short",
    );
    assert_invalid(
        FrameView::new(PixelFormat::Rgbx, 5, 3, vec![b], vec![19]),
        "stride below a row",
    );
    assert_invalid(
        FrameView::new(PixelFormat::Bgra, 0, 3, vec![b], vec![0]),
        "zero width",
    );
    assert_invalid(
        FrameView::new(PixelFormat::Rgb, 4, 0, vec![b], vec![12]),
        "zero height",
    );
    assert_invalid(
        FrameView::new(PixelFormat::I420, 7, 5, vec![b, b], vec![7, 4]),
        "I420 missing a plane",
    );
    assert_invalid(
        FrameView::new(PixelFormat::I420, 7, 5, vec![b, b, b], vec![7, 4]),
        "I420 missing a stride",
    );
    // 7x5 → chroma 4x3: 12 bytes needed; 3x2 (rounded down) is not enough.
    assert_invalid(
        FrameView::new(
            PixelFormat::I420,
            7,
            5,
            vec![&b[..35], &b[..6], &b[..12]],
            vec![7, 3, 4],
        ),
        "I420 chroma stride rounded down",
    );
    assert_invalid(
        FrameView::new(
            PixelFormat::I420,
            7,
            5,
            vec![&b[..35], &b[..11], &b[..12]],
            vec![7, 4, 4],
        ),
        "I420 U plane one byte short",
    );
    assert_invalid(
        FrameView::new(
            PixelFormat::Nv12,
            7,
            5,
            vec![&b[..35], &b[..23]],
            vec![7, 8],
        ),
        "NV12 UV plane one byte short",
    );
    assert_invalid(
        FrameView::new(
            PixelFormat::Rgb,
            usize::MAX / 2,
            3,
            vec![b],
            vec![usize::MAX],
        ),
        "overflowing size",
    );
    // Exactly enough bytes is fine.
    let ok = FrameView::new(
        PixelFormat::Nv12,
        7,
        5,
        vec![&b[..35], &b[..24]],
        vec![7, 8],
    );
    assert!(ok.to_rgb().is_ok());

    let processor = ClipPreprocess::clip_224();
    assert!(processor
        .pixels(&FrameView::new(
            PixelFormat::Rgb,
            5,
            3,
            vec![&b[..10]],
            vec![15]
        ))
        .is_err());
    assert!(RgbImage::new(2, 2, vec![0; 11]).is_err());
}

// ---------------------------------------------------------------------------------------------
// (c) Resize

#[test]
fn resize_matches_pillow_bit_for_bit() {
    // (src w, src h, dst w, dst h, seed, FNV-1a of Pillow's output bytes), from
    // `Image.frombytes("RGB", ...).resize((dst w, dst h), Image.BICUBIC).tobytes()` with Pillow
    // 10.4 (the horizontal-then-vertical order of every Pillow before 12.2; 12.2+ filters images
    // taller than 100x their width vertically first, which changes the 3x1000 case).
    // `plugin/scripts/pillow-resize-hashes.sh` regenerates this table with Pillow 10.4 from
    // PyPI (tests/scripts/pillow_resize_hashes.py); `--check` compares it with this one, as
    // gst-tests/run-all.sh does.
    let cases: [(usize, usize, usize, usize, u32, u64); 10] = [
        (37, 91, 224, 551, 1000, 0x97d2f40077ae4ea6),
        (64, 48, 74, 56, 1001, 0xdeefdd07c9717792),
        (91, 37, 20, 9, 1002, 0xb56a8c47eff0bf15),
        (1001, 7, 13, 3, 1003, 0x373c4eca4393ff5d),
        (3, 1000, 7, 50, 1004, 0x7533d140fa0b4cd7),
        (1, 1, 5, 3, 1005, 0x554af6fbe1b8ae40),
        (50, 50, 50, 20, 1006, 0xbd59a6294e79d678),
        (50, 50, 17, 50, 1007, 0xb1f6b0d52e358954),
        (640, 360, 398, 224, 1008, 0x207fb40186581c99),
        (5, 4, 1, 1, 1009, 0x697b80194f37345b),
    ];
    for (w, h, ow, oh, seed, hash) in cases {
        let out = resize_bicubic(&lcg_image(seed, w, h), ow, oh);
        assert_eq!((out.width, out.height), (ow, oh));
        assert_eq!(out.data.len(), ow * oh * 3);
        assert_eq!(fnv1a(&out.data), hash, "{w}x{h} -> {ow}x{oh}");
    }
}

#[test]
fn resize_to_same_size_is_identity() {
    let img = lcg_image(3, 13, 7);
    assert_eq!(resize_bicubic(&img, 13, 7), img);
}

#[test]
fn resize_keeps_constant_images_constant() {
    for (w, h, ow, oh) in [
        (37, 91, 224, 551),
        (91, 37, 20, 9),
        (1, 1, 5, 3),
        (8, 8, 3, 11),
    ] {
        for colour in [[0, 0, 0], [255, 255, 255], [10, 200, 77]] {
            let out = resize_bicubic(&RgbImage::filled(w, h, colour), ow, oh);
            assert_eq!(
                out,
                RgbImage::filled(ow, oh, colour),
                "{w}x{h} -> {ow}x{oh}"
            );
        }
    }
}

/// The region `cols` x `rows` cut out of a full image.
fn cut(img: &RgbImage, cols: std::ops::Range<usize>, rows: std::ops::Range<usize>) -> RgbImage {
    let mut data = Vec::new();
    for y in rows.clone() {
        data.extend_from_slice(&img.data[(y * img.width + cols.start) * 3..][..cols.len() * 3]);
    }
    RgbImage {
        width: cols.len(),
        height: rows.len(),
        data,
    }
}

#[test]
fn a_resized_window_equals_the_same_region_of_the_full_resize() {
    // Up, down, one axis unchanged, windows at the edges and in the middle.
    for (w, h, ow, oh) in [
        (37, 91, 224, 551),
        (91, 37, 20, 9),
        (64, 48, 64, 96),
        (5, 300, 224, 224),
    ] {
        let img = lcg_image(21, w, h);
        let full = resize_bicubic(&img, ow, oh);
        for (cols, rows) in [
            (0..ow, 0..oh),
            (0..ow.min(3), oh / 2..oh),
            (ow / 3..ow / 3 + ow.min(7), 1..oh.min(2)),
            (ow - 1..ow, oh - 1..oh),
        ] {
            let window = resize_bicubic_window(&img, ow, oh, cols.clone(), rows.clone());
            assert_eq!(
                window,
                cut(&full, cols.clone(), rows.clone()),
                "{w}x{h} -> {ow}x{oh}, columns {cols:?}, rows {rows:?}"
            );
        }
    }
}

#[test]
fn resize_odd_sizes_do_not_panic() {
    for (w, h) in [(1, 1), (3, 1000), (1001, 7), (2, 1), (1, 2)] {
        let img = lcg_image(9, w, h);
        for (ow, oh) in [(1, 1), (224, 3), (3, 224), (w, 1), (1, h), (w + 1, h + 1)] {
            let out = resize_bicubic(&img, ow, oh);
            assert_eq!(out.data.len(), ow * oh * 3);
        }
        assert!(resize_bicubic(&img, 0, 5).data.is_empty());
    }
}

#[test]
fn resize_weights_are_normalised() {
    // Pillow's rounded weights sum to one within a few units per output pixel.
    for (n, m) in [(48, 56), (64, 74), (1280, 398), (7, 224), (1, 9), (9, 1)] {
        let c = AxisTaps::bicubic(n, m);
        assert_eq!(c.starts.len(), m);
        for i in 0..m {
            let sum: i64 = c.weights[i * c.ksize..][..c.counts[i]]
                .iter()
                .map(|&w| i64::from(w))
                .sum();
            assert!(
                (sum - (1 << PRECISION_BITS)).abs() <= c.ksize as i64,
                "{n}->{m} pixel {i}"
            );
            assert!(c.starts[i] + c.counts[i] <= n);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// CLIP geometry and normalisation

fn normalised(c: usize, x: u8) -> f32 {
    (f32::from(x) / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c]
}

#[test]
fn shortest_edge_truncates_the_long_side() {
    let p = ClipPreprocess::clip_224();
    assert_eq!(p.resized_size(1280, 720), (224, 398));
    assert_eq!(p.resized_size(720, 1280), (398, 224));
    assert_eq!(p.resized_size(64, 48), (224, 298));
    assert_eq!(p.resized_size(224, 500), (500, 224));
    assert_eq!(p.resized_size(300, 300), (224, 224));
    assert_eq!(p.output_size(1280, 720), (224, 224));
}

#[test]
fn centre_crop_of_a_larger_image_takes_the_floor_centred_window() {
    // 9x6 image, shortest edge 6 = no resize, crop 3 high x 4 wide: top 1, left 2.
    let img = lcg_image(21, 9, 6);
    let p = ClipPreprocess {
        resize: ResizeTarget::ShortestEdge(6),
        crop: Some((3, 4)),
        ..ClipPreprocess::clip_224()
    };
    let out = p.pixels_from_rgb(&img);
    assert_eq!(out.len(), 3 * 3 * 4);
    for c in 0..3 {
        for y in 0..3 {
            for x in 0..4 {
                let want = normalised(c, img.pixel(x + 2, y + 1)[c]);
                let got = out[c * 12 + y * 4 + x];
                assert!(
                    (got - want).abs() <= 1e-6,
                    "c{c} ({x},{y}): {got} vs {want}"
                );
            }
        }
    }
}

#[test]
fn centre_crop_of_a_smaller_image_pads_with_zero_pixels() {
    // 4x3 image, no resize, crop 7 high x 6 wide: 2 rows above, 1 column left, zeros around.
    let img = lcg_image(22, 4, 3);
    let p = ClipPreprocess {
        resize: ResizeTarget::Keep,
        crop: Some((7, 6)),
        ..ClipPreprocess::clip_224()
    };
    let out = p.pixels_from_rgb(&img);
    assert_eq!(out.len(), 3 * 7 * 6);
    for c in 0..3 {
        for y in 0..7 {
            for x in 0..6 {
                let inside = (1..5).contains(&x) && (2..5).contains(&y);
                let raw = if inside {
                    img.pixel(x - 1, y - 2)[c]
                } else {
                    0
                };
                let got = out[c * 42 + y * 6 + x];
                assert!((got - normalised(c, raw)).abs() <= 1e-6, "c{c} ({x},{y})");
            }
        }
    }
    // Through the whole pipeline with a resize, on a degenerate frame.
    let tiny = ClipPreprocess {
        resize: ResizeTarget::ShortestEdge(2),
        crop: Some((5, 5)),
        ..ClipPreprocess::clip_224()
    };
    let px = [200u8, 100, 50];
    let out = tiny
        .pixels(&FrameView::new(
            PixelFormat::Rgb,
            1,
            1,
            vec![&px[..]],
            vec![3],
        ))
        .unwrap();
    assert_eq!(out.len(), 75);
}

#[test]
fn odd_frames_go_through_the_whole_pipeline() {
    let p = ClipPreprocess {
        resize: ResizeTarget::ShortestEdge(8),
        crop: Some((8, 8)),
        ..ClipPreprocess::clip_224()
    };
    for (w, h) in [(1, 1), (3, 1000), (1001, 7), (2, 3)] {
        let img = lcg_image(5, w, h);
        let frame = FrameView::packed_rgb(w, h, &img.data);
        assert_eq!(p.pixels(&frame).unwrap().len(), 3 * 64, "{w}x{h}");
    }
}

#[test]
fn tensor_stacks_frames_channel_first() {
    let p = ClipPreprocess {
        resize: ResizeTarget::ShortestEdge(6),
        crop: Some((6, 6)),
        ..ClipPreprocess::clip_224()
    };
    let a = lcg_image(31, 8, 6);
    let b = RgbImage::filled(6, 9, [255, 0, 128]);
    let t = p.tensor_from_rgb(&[a.clone(), b], &Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[2, 3, 6, 6]);
    assert_eq!(t.dtype(), DType::F32);
    let first: Vec<f32> = t.get(0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(first, p.pixels_from_rgb(&a));
    let green: Tensor = t.get(1).unwrap().get(1).unwrap();
    let min = green
        .flatten_all()
        .unwrap()
        .min(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((min - normalised(1, 0)).abs() <= 1e-6);

    assert!(p.tensor(&[], &Device::Cpu).is_err());
    let no_crop = ClipPreprocess { crop: None, ..p };
    let sizes = [lcg_image(1, 8, 6), lcg_image(2, 6, 8)];
    assert!(no_crop.tensor_from_rgb(&sizes, &Device::Cpu).is_err());
}

// ---------------------------------------------------------------------------------------------
// preprocessor_config.json

fn write_config(name: &str, json: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("llamavid-preprocess-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, json).unwrap();
    path
}

fn bad_file(path: &Path, field: &str) {
    match ClipPreprocess::from_config_file(path) {
        Err(e @ ModelError::BadFile { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(field), "{msg} should name `{field}`");
            assert!(
                msg.contains(&path.display().to_string()),
                "{msg} should name the file"
            );
        }
        other => panic!(
            "{}: expected BadFile naming {field}, got {other:?}",
            path.display()
        ),
    }
}

const MEAN_STD: &str = r#""image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711]"#;

#[test]
fn config_accepts_every_size_spelling() {
    let int = write_config(
        "int.json",
        &format!(r#"{{"size": 224, "crop_size": 224, "resample": 3, {MEAN_STD}}}"#),
    );
    assert_eq!(
        ClipPreprocess::from_config_file(&int).unwrap(),
        ClipPreprocess::clip_224()
    );

    let dicts = write_config(
        "dicts.json",
        &format!(
            r#"{{"size": {{"shortest_edge": 336}}, "crop_size": {{"height": 320, "width": 330}},
                "rescale_factor": 0.5, {MEAN_STD}}}"#
        ),
    );
    let p = ClipPreprocess::from_config_file(&dicts).unwrap();
    assert_eq!(p.resize, ResizeTarget::ShortestEdge(336));
    assert_eq!(p.crop, Some((320, 330)));
    assert_eq!(p.rescale, Some(0.5));

    let exact = write_config(
        "exact.json",
        r#"{"size": {"height": 30, "width": 40}, "do_center_crop": false,
            "do_normalize": false, "do_rescale": false}"#,
    );
    let p = ClipPreprocess::from_config_file(&exact).unwrap();
    assert_eq!(
        p,
        ClipPreprocess {
            resize: ResizeTarget::Exact {
                height: 30,
                width: 40
            },
            crop: None,
            rescale: None,
            normalize: None,
        }
    );
    // No rescale, no normalise: raw byte values, resized to 30x40.
    let out = p.pixels_from_rgb(&RgbImage::filled(7, 5, [1, 2, 3]));
    assert_eq!(out.len(), 3 * 30 * 40);
    assert_eq!((out[0], out[1200], out[2400]), (1.0, 2.0, 3.0));

    let scalar = write_config(
        "scalar.json",
        r#"{"do_resize": false, "crop_size": 4, "image_mean": 0.5, "image_std": 0.25}"#,
    );
    let p = ClipPreprocess::from_config_file(&scalar).unwrap();
    assert_eq!(p.resize, ResizeTarget::Keep);
    assert_eq!(
        p.normalize,
        Some(Normalize {
            mean: [0.5; 3],
            std: [0.25; 3]
        })
    );
}

#[test]
fn config_errors_name_file_and_field() {
    let cases = [
        (
            "no_mean.json",
            r#"{"size": 224, "crop_size": 224, "image_std": [1, 1, 1]}"#,
            "image_mean",
        ),
        (
            "two_std.json",
            r#"{"size": 224, "crop_size": 224, "image_mean": [0, 0, 0], "image_std": [1, 1]}"#,
            "image_std",
        ),
        (
            "zero_std.json",
            r#"{"size": 224, "crop_size": 224, "image_mean": [0, 0, 0], "image_std": [1, 0, 1]}"#,
            "image_std",
        ),
        (
            "no_size.json",
            r#"{"crop_size": 224, "image_mean": [0, 0, 0], "image_std": [1, 1, 1]}"#,
            "size",
        ),
        (
            "bad_size.json",
            r#"{"size": {"longest_edge": 3}, "crop_size": 224, "image_mean": [0, 0, 0], "image_std": [1, 1, 1]}"#,
            "size",
        ),
        (
            "neg_crop.json",
            r#"{"size": 224, "crop_size": -1, "image_mean": [0, 0, 0], "image_std": [1, 1, 1]}"#,
            "crop_size",
        ),
        (
            "str_flag.json",
            r#"{"do_resize": "yes", "size": 224, "crop_size": 224, "image_mean": [0, 0, 0], "image_std": [1, 1, 1]}"#,
            "do_resize",
        ),
        (
            "bilinear.json",
            r#"{"resample": 2, "size": 224, "crop_size": 224, "image_mean": [0, 0, 0], "image_std": [1, 1, 1]}"#,
            "resample",
        ),
        (
            "factor.json",
            r#"{"rescale_factor": "1/255", "size": 224, "crop_size": 224, "image_mean": [0, 0, 0], "image_std": [1, 1, 1]}"#,
            "rescale_factor",
        ),
        ("not_json.json", "{size: 224", "JSON"),
    ];
    for (name, json, field) in cases {
        bad_file(&write_config(name, json), field);
    }
    match ClipPreprocess::from_config_file(Path::new("/nonexistent/preprocessor_config.json")) {
        Err(ModelError::Io { .. }) => {}
        other => panic!("expected Io error, got {other:?}"),
    }
}
