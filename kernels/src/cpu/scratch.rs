//! Per-thread pools of scratch buffers: the kernels' intermediate results reuse the same
//! memory call after call (no page faults, and zeroing only when a buffer grows).

/// Element types of the scratch buffers.
pub trait ScratchElem: Copy + Default + 'static {
    fn pool() -> &'static std::thread::LocalKey<std::cell::RefCell<Vec<Vec<Self>>>>;
}

macro_rules! scratch_pool {
    ($t:ty, $name:ident) => {
        thread_local! {
            static $name: std::cell::RefCell<Vec<Vec<$t>>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        impl ScratchElem for $t {
            fn pool() -> &'static std::thread::LocalKey<std::cell::RefCell<Vec<Vec<Self>>>> {
                &$name
            }
        }
    };
}
scratch_pool!(f32, POOL_F32);
scratch_pool!(u16, POOL_U16);
scratch_pool!(u8, POOL_U8);
scratch_pool!(i32, POOL_I32);

/// A buffer borrowed from a per-thread pool and returned to it when dropped: the kernels'
/// intermediate results reuse the same memory call after call (no page faults, and zeroing
/// only when a buffer grows). Its contents on arrival are unspecified (old values).
pub struct Scratch<T: ScratchElem> {
    /// Always initialised over its whole length (the largest size it was asked for).
    buf: Vec<T>,
    len: usize,
}

/// Buffers kept per thread and element type.
const POOL_SIZE: usize = 12;

impl<T: ScratchElem> Scratch<T> {
    pub fn new(len: usize) -> Self {
        let mut buf = T::pool().with(|p| {
            let mut p = p.borrow_mut();
            // The smallest buffer that is large enough, else the largest one.
            let best = p
                .iter()
                .enumerate()
                .filter(|(_, b)| b.len() >= len)
                .min_by_key(|(_, b)| b.len())
                .map(|(i, _)| i)
                .or_else(|| {
                    p.iter()
                        .enumerate()
                        .max_by_key(|(_, b)| b.len())
                        .map(|(i, _)| i)
                });
            best.map(|i| p.swap_remove(i)).unwrap_or_default()
        });
        if buf.len() < len {
            buf.resize(len, T::default());
        }
        Self { buf, len }
    }
}

impl<T: ScratchElem> Drop for Scratch<T> {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let _ = T::pool().try_with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOL_SIZE {
                p.push(buf);
            }
        });
    }
}

impl<T: ScratchElem> std::ops::Deref for Scratch<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.buf[..self.len]
    }
}

impl<T: ScratchElem> std::ops::DerefMut for Scratch<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.buf[..self.len]
    }
}
