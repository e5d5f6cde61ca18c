//! The preprocessing of one frame as the parameters of the `kernels` crate's one-pass kernel
//! (and its CPU twin): the same integer YUV coefficients, the same Pillow taps and the same
//! crop and normalisation as [`ClipPreprocess::pixels`], so that GPU and CPU agree bit for bit.

use llamavid_kernels::preprocess::centre_crop_offset;
use llamavid_kernels::{AxisTaps, Plane, PreprocessParams};

use super::{ClipPreprocess, FrameView};

impl ClipPreprocess {
    /// Kernel parameters for `frame`, whose planes are passed separately (offset 0 each).
    pub fn kernel_params(&self, frame: &FrameView) -> PreprocessParams {
        let (w, h) = (frame.width, frame.height);
        let (rh, rw) = self.resized_size(w, h);
        let (oh, ow) = self.crop.unwrap_or((rh, rw));
        PreprocessParams {
            format: frame.format,
            width: w,
            height: h,
            planes: frame
                .strides
                .iter()
                .map(|&stride| Plane { offset: 0, stride })
                .collect(),
            yuv: frame.yuv.coefficients(),
            horizontal: AxisTaps::for_resize(w, rw),
            vertical: AxisTaps::for_resize(h, rh),
            crop_left: centre_crop_offset(rw, ow),
            crop_top: centre_crop_offset(rh, oh),
            out_width: ow,
            out_height: oh,
            normalization: self.normalization(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::preprocess::{PixelFormat, YuvToRgb};

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
