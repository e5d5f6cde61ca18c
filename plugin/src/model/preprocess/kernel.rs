//! The preprocessing of one frame as the parameters of the `kernels` crate's one-pass kernel
//! (and its CPU twin): the same integer YUV coefficients, the same Pillow taps and the same
//! crop and normalisation as [`ClipPreprocess::pixels`], so that GPU and CPU agree bit for bit.

use llamavid_kernels::{AxisTaps, Normalization, Plane, PreprocessParams, SourceFormat, YuvCoeffs};

use super::{AxisCoeffs, ClipPreprocess, FrameView, PixelFormat};

fn source_format(format: PixelFormat) -> SourceFormat {
    match format {
        PixelFormat::Rgb => SourceFormat::Rgb,
        PixelFormat::Rgbx => SourceFormat::Rgbx,
        PixelFormat::Bgrx => SourceFormat::Bgrx,
        PixelFormat::Rgba => SourceFormat::Rgba,
        PixelFormat::Bgra => SourceFormat::Bgra,
        PixelFormat::I420 => SourceFormat::I420,
        PixelFormat::Nv12 => SourceFormat::Nv12,
    }
}

/// Pillow leaves an axis whose size does not change unfiltered.
fn axis(in_size: usize, out_size: usize) -> AxisTaps {
    if in_size == out_size {
        return AxisTaps::identity(in_size);
    }
    let c = AxisCoeffs::bicubic(in_size, out_size);
    AxisTaps {
        in_size,
        ksize: c.ksize,
        starts: c.starts,
        counts: c.counts,
        weights: c.weights,
    }
}

impl ClipPreprocess {
    /// Kernel parameters for `frame`, whose planes are passed separately (offset 0 each).
    pub fn kernel_params(&self, frame: &FrameView) -> PreprocessParams {
        let (w, h) = (frame.width, frame.height);
        let (rh, rw) = self.resized_size(w, h);
        let (oh, ow) = self.crop.unwrap_or((rh, rw));
        let c = frame.yuv.coefficients();
        PreprocessParams {
            format: source_format(frame.format),
            width: w,
            height: h,
            planes: frame
                .strides
                .iter()
                .map(|&stride| Plane { offset: 0, stride })
                .collect(),
            yuv: YuvCoeffs {
                y_offset: c.y_offset,
                y_gain: c.y_gain,
                r_v: c.r_v,
                g_u: c.g_u,
                g_v: c.g_v,
                b_u: c.b_u,
            },
            horizontal: axis(w, rw),
            vertical: axis(h, rh),
            crop_left: PreprocessParams::centre_crop_offset(rw, ow),
            crop_top: PreprocessParams::centre_crop_offset(rh, oh),
            out_width: ow,
            out_height: oh,
            normalization: Normalization {
                rescale: self.rescale,
                mean_std: self.normalize.map(|n| (n.mean, n.std)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::preprocess::YuvToRgb;

    #[test]
    fn the_cpu_twin_of_the_kernel_agrees_with_the_model_preprocessing() {
        // An odd-sized NV12 frame with padded strides, shrunk and cropped.
        let (w, h) = (37usize, 23usize);
        let luma: Vec<u8> = (0..40 * h).map(|i| (i * 7 % 251) as u8).collect();
        let chroma: Vec<u8> = (0..40 * h.div_ceil(2))
            .map(|i| (i * 13 % 241) as u8)
            .collect();
        let frame = FrameView::new(PixelFormat::Nv12, w, h, vec![&luma, &chroma], vec![40, 40])
            .with_yuv(YuvToRgb::default_for_height(h));
        let mut pre = ClipPreprocess::clip_224();
        pre.resize = super::super::ResizeTarget::ShortestEdge(14);
        pre.crop = Some((14, 14));
        let params = pre.kernel_params(&frame);
        let twin = llamavid_kernels::preprocess::cpu::preprocess_planes(&params, &frame.planes)
            .expect("valid parameters");
        assert_eq!(twin, pre.pixels(&frame).unwrap());
    }
}
