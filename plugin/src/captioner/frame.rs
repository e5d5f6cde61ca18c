//! A sampled frame copied out of the pipeline's buffer, so that upstream buffer pools (a
//! camera's few buffers) are never held while the model works.

use crate::model::preprocess::{FrameView, PixelFormat, YuvToRgb};

#[derive(Debug, Clone)]
pub struct OwnedFrame {
    pub format: PixelFormat,
    pub width: usize,
    pub height: usize,
    pub planes: Vec<Vec<u8>>,
    pub strides: Vec<usize>,
    pub yuv: YuvToRgb,
}

impl OwnedFrame {
    /// Copies the planes of `view`.
    pub fn copy_from(view: &FrameView) -> Self {
        Self {
            format: view.format,
            width: view.width,
            height: view.height,
            planes: view.planes.iter().map(|p| p.to_vec()).collect(),
            strides: view.strides.clone(),
            yuv: view.yuv,
        }
    }

    pub fn view(&self) -> FrameView<'_> {
        FrameView::new(
            self.format,
            self.width,
            self.height,
            self.planes.iter().map(Vec::as_slice).collect(),
            self.strides.clone(),
        )
        .with_yuv(self.yuv)
    }
}
