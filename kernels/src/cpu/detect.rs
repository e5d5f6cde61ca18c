//! What this CPU (and its operating system) lets the reduced-precision kernels use.

/// Instruction-set extensions the kernels care about.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuFeatures {
    pub avx512f: bool,
    pub avx512bw: bool,
    /// `vdpbf16ps` (bf16 dot products, our small-batch bf16 kernel).
    pub avx512_bf16: bool,
    /// `vpdpbusd` (u8 x s8 dot products, our small-batch int8 kernel).
    pub avx512_vnni: bool,
    /// AMX tiles usable by this process: the CPU has AMX-TILE/BF16/INT8, the OS saves the tile
    /// state (XCR0 bits 17 and 18) and, on Linux, granted this process the tile data.
    pub amx: bool,
}

impl CpuFeatures {
    /// Detected once per process. `LLAMAVID_CPU_FEATURES=plain` hides every extension (for
    /// testing the fallback path on a capable machine).
    pub fn get() -> Self {
        static FEATURES: std::sync::OnceLock<CpuFeatures> = std::sync::OnceLock::new();
        *FEATURES.get_or_init(|| {
            if std::env::var("LLAMAVID_CPU_FEATURES").is_ok_and(|v| v == "plain") {
                return CpuFeatures::default();
            }
            detect()
        })
    }

    /// Both small-batch kernels and AMX (what the reduced-precision modes need).
    pub fn reduced_precision(&self) -> bool {
        self.amx && self.avx512f && self.avx512bw && self.avx512_bf16 && self.avx512_vnni
    }
}

#[cfg(target_arch = "x86_64")]
fn detect() -> CpuFeatures {
    CpuFeatures {
        avx512f: std::arch::is_x86_feature_detected!("avx512f"),
        avx512bw: std::arch::is_x86_feature_detected!("avx512bw"),
        avx512_bf16: std::arch::is_x86_feature_detected!("avx512bf16"),
        avx512_vnni: std::arch::is_x86_feature_detected!("avx512vnni"),
        amx: amx_usable(),
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> CpuFeatures {
    CpuFeatures::default()
}

/// CPUID leaf 7 EDX: AMX-BF16 (bit 22), AMX-TILE (24), AMX-INT8 (25); XCR0 bits 17-18 (tile
/// config and data enabled by the OS); then Linux's per-process permission for tile data.
#[cfg(target_arch = "x86_64")]
fn amx_usable() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    let max_leaf = __cpuid(0).eax;
    if max_leaf < 7 {
        return false;
    }
    let leaf7 = __cpuid_count(7, 0);
    let bit = |b: u32| leaf7.edx & (1 << b) != 0;
    if !(bit(22) && bit(24) && bit(25)) {
        return false;
    }
    let leaf1 = __cpuid(1);
    let osxsave = leaf1.ecx & (1 << 27) != 0;
    if !osxsave {
        return false;
    }
    // SAFETY: xgetbv is available when OSXSAVE is set (checked above).
    let xcr0 = unsafe { xgetbv0() };
    if xcr0 & (0b11 << 17) != (0b11 << 17) {
        return false;
    }
    request_tile_permission()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "xsave")]
unsafe fn xgetbv0() -> u64 {
    std::arch::x86_64::_xgetbv(0)
}

/// Linux (5.16+) makes each process ask for the AMX tile state before using it; MKL asks too,
/// but asking here tells us whether the kernel grants it.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_permission() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes this process's permitted
    // extended-state components; it has no memory effects.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn request_tile_permission() -> bool {
    true
}
