//! A mapped video buffer as the model's `FrameView`.

use gst_video::prelude::*;

use crate::model::preprocess::{FrameView, PixelFormat, YuvMatrix, YuvRange, YuvToRgb};

/// The raw formats the element accepts, as GStreamer names them.
pub const FORMATS: [gst_video::VideoFormat; 7] = [
    gst_video::VideoFormat::Rgb,
    gst_video::VideoFormat::Rgbx,
    gst_video::VideoFormat::Bgrx,
    gst_video::VideoFormat::Rgba,
    gst_video::VideoFormat::Bgra,
    gst_video::VideoFormat::I420,
    gst_video::VideoFormat::Nv12,
];

pub fn pixel_format(format: gst_video::VideoFormat) -> Option<PixelFormat> {
    use gst_video::VideoFormat as V;
    Some(match format {
        V::Rgb => PixelFormat::Rgb,
        V::Rgbx => PixelFormat::Rgbx,
        V::Bgrx => PixelFormat::Bgrx,
        V::Rgba => PixelFormat::Rgba,
        V::Bgra => PixelFormat::Bgra,
        V::I420 => PixelFormat::I420,
        V::Nv12 => PixelFormat::Nv12,
        _ => return None,
    })
}

/// The YUV conversion the caps' colorimetry asks for, GStreamer's defaults otherwise.
fn yuv_to_rgb(info: &gst_video::VideoInfo) -> YuvToRgb {
    let mut yuv = YuvToRgb::default_for_height(info.height() as usize);
    let colorimetry = info.colorimetry();
    match colorimetry.matrix() {
        gst_video::VideoColorMatrix::Bt601 => yuv.matrix = YuvMatrix::Bt601,
        gst_video::VideoColorMatrix::Bt709 => yuv.matrix = YuvMatrix::Bt709,
        gst_video::VideoColorMatrix::Bt2020 => yuv.matrix = YuvMatrix::Bt2020,
        _ => {}
    }
    if colorimetry.range() == gst_video::VideoColorRange::Range0_255 {
        yuv.range = YuvRange::Full;
    }
    yuv
}

/// Borrows the planes of a mapped frame.
pub fn view<'a>(frame: &'a gst_video::VideoFrameRef<&'a gst::BufferRef>) -> Option<FrameView<'a>> {
    let info = frame.info();
    let format = pixel_format(info.format())?;
    let planes = (0..frame.n_planes())
        .map(|p| frame.plane_data(p).ok())
        .collect::<Option<Vec<&[u8]>>>()?;
    let strides = info.stride()[..planes.len()]
        .iter()
        .map(|&s| s.max(0) as usize)
        .collect();
    Some(
        FrameView::new(
            format,
            info.width() as usize,
            info.height() as usize,
            planes,
            strides,
        )
        .with_yuv(yuv_to_rgb(info)),
    )
}
