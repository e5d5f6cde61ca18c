//! Self-contained checks of the CPU twins (the model-level comparisons live in
//! plugin/tests/kernel_twins.rs, since this crate cannot depend on the plugin).

use candle_core::{Device, Tensor};
use llamavid_kernels::compress::{self, cpu, CompressShape, BLOCK};
use llamavid_kernels::preprocess::{centre_crop_offset, cpu as twin};
use llamavid_kernels::{
    AxisTaps, Normalization, PixelFormat, Plane, PreprocessParams, YuvCoefficients,
};

fn packed_params(format: PixelFormat, w: usize, h: usize, stride: usize) -> PreprocessParams {
    PreprocessParams {
        format,
        width: w,
        height: h,
        planes: vec![Plane { offset: 5, stride }],
        yuv: YuvCoefficients::default(),
        horizontal: AxisTaps::identity(w),
        vertical: AxisTaps::identity(h),
        crop_left: 0,
        crop_top: 0,
        out_width: w,
        out_height: h,
        normalization: Normalization {
            rescale: None,
            mean_std: None,
        },
    }
}

#[test]
fn identity_taps_copy_the_source_channel_first() {
    let (w, h) = (5, 3);
    for (format, bpp, order) in [
        (PixelFormat::Rgb, 3, [0, 1, 2]),
        (PixelFormat::Rgbx, 4, [0, 1, 2]),
        (PixelFormat::Rgba, 4, [0, 1, 2]),
        (PixelFormat::Bgrx, 4, [2, 1, 0]),
        (PixelFormat::Bgra, 4, [2, 1, 0]),
    ] {
        let stride = w * bpp + 3;
        let src: Vec<u8> = (0..5 + stride * h).map(|i| (i * 7 % 251) as u8).collect();
        let p = packed_params(format, w, h, stride);
        let out = twin::resample_u8(&p, &src).unwrap();
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    let want = src[5 + y * stride + x * bpp + order[c]];
                    assert_eq!(
                        out[c * w * h + y * w + x],
                        want,
                        "{format:?} ({x},{y}) c{c}"
                    );
                }
            }
        }
        // Raw normalisation (no rescale, no mean/std) is the byte value itself.
        let f = twin::preprocess(&p, &src).unwrap();
        assert!(f.iter().zip(&out).all(|(&f, &b)| f == f32::from(b)));
    }
}

#[test]
fn crop_outside_the_image_is_zero() {
    let (w, h) = (4, 2);
    let src = vec![200u8; w * 3 * h + 5];
    let mut p = packed_params(PixelFormat::Rgb, w, h, w * 3);
    p.out_width = 6;
    p.out_height = 4;
    p.crop_left = centre_crop_offset(w, 6);
    p.crop_top = centre_crop_offset(h, 4);
    assert_eq!((p.crop_left, p.crop_top), (-1, -1));
    let out = twin::resample_u8(&p, &src).unwrap();
    let plane = &out[..24];
    assert_eq!(&plane[..6], &[0; 6], "top padding row");
    assert_eq!(&plane[6..12], &[0, 200, 200, 200, 200, 0]);
    assert_eq!(&plane[18..24], &[0; 6], "bottom padding row");
}

#[test]
fn yuv_full_range_grey_is_grey() {
    let c = YuvCoefficients {
        y_offset: 0,
        y_gain: 1 << 16,
        r_v: 91881,
        g_u: 22554,
        g_v: 46802,
        b_u: 116130,
    };
    for y in [0u8, 1, 77, 128, 254, 255] {
        assert_eq!(c.convert(y, 128, 128), [y; 3]);
    }
}

#[test]
fn value_table_is_numpy_arithmetic() {
    let n = Normalization {
        rescale: Some(1.0 / 255.0),
        mean_std: Some(([0.5, 0.25, 0.125], [0.5, 2.0, 0.25])),
    };
    let t = n.value_table();
    for x in [0usize, 1, 100, 255] {
        let v = (x as f64 / 255.0) as f32;
        assert_eq!(t[0][x], (v - 0.5) / 0.5);
        assert_eq!(t[1][x], (v - 0.25) / 2.0);
        assert_eq!(t[2][x], (v - 0.125) / 0.25);
    }
}

#[test]
fn reductions_sum_exactly_representable_values_exactly() {
    let x: Vec<f32> = (0..1000).map(|i| (i % 17) as f32).collect();
    let ones = vec![1f32; 1000];
    let want: f32 = x.iter().sum();
    assert_eq!(cpu::warp_dot(&x, &ones), want);
    assert_eq!(cpu::block_sum(&x), want);
    assert_eq!(cpu::block_sum(&x[..3]), x[..3].iter().sum::<f32>());
    assert_eq!(BLOCK, 256);
}

#[test]
fn uniform_attention_pools_to_the_patch_mean() {
    // Identical keys: every score is equal, the softmax uniform, context == content == mean.
    let (b, q, n, w) = (2, 3, 5, 7);
    let s = CompressShape {
        batch: b,
        queries: q,
        patches: n,
        width: w,
    };
    let tq: Vec<f32> = (0..b * q * w).map(|i| (i as f32 * 0.37).sin()).collect();
    let keys = vec![0.5f32; b * n * w];
    let patches: Vec<f32> = (0..b * n * w).map(|i| (i % 8) as f32).collect();
    let (context, content) = cpu::compress(&tq, &keys, &patches, s, 0.25);
    for i in 0..b * w {
        let (bb, col) = (i / w, i % w);
        let mean = (0..n).map(|k| patches[(bb * n + k) * w + col]).sum::<f32>() / n as f32;
        assert!((content[i] - mean).abs() <= 1e-6, "content {i}");
        assert!((context[i] - mean).abs() <= 1e-5, "context {i}");
    }
}

#[test]
fn tensor_entry_point_checks_shapes_and_dtypes() {
    let d = Device::Cpu;
    let t = |s: (usize, usize, usize)| Tensor::ones(s, candle_core::DType::F32, &d).unwrap();
    assert!(compress::compress(&t((2, 3, 4)), &t((2, 5, 4)), &t((2, 5, 4))).is_ok());
    assert!(compress::compress(&t((2, 3, 4)), &t((2, 5, 4)), &t((2, 6, 4))).is_err());
    assert!(compress::compress(&t((2, 3, 4)), &t((1, 5, 4)), &t((1, 5, 4))).is_err());
    let i = Tensor::ones((2, 5, 4), candle_core::DType::U32, &d).unwrap();
    assert!(compress::compress(&t((2, 3, 4)), &i, &t((2, 5, 4))).is_err());
}
