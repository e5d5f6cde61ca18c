//! What the CPU offers ([`CpuFeatures`], detected once, without side effects) and what one
//! model's kernels may use ([`Isa`]): the detected features narrowed by an [`IsaLimit`].
//!
//! `Isa` is the single dispatch point of every kernel compiled for an extension. It can only be
//! made by detection (then narrowed), so holding one proves the CPU has each extension it
//! names; a kernel reaches code compiled with `#[target_feature]` only through an `Isa` whose
//! level covers every feature that code enables (see the constants below).

use std::fmt;
use std::str::FromStr;

/// Instruction-set extensions the kernels care about, as the CPU and the OS report them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuFeatures {
    pub avx2: bool,
    pub fma: bool,
    pub f16c: bool,
    pub avx512f: bool,
    pub avx512bw: bool,
    pub avx512vl: bool,
    pub avx512dq: bool,
    /// `vdpbf16ps`, `vcvtneps2bf16` (bf16 dot products and conversion).
    pub avx512_bf16: bool,
    /// `vpdpbusd` (u8 × s8 dot products).
    pub avx512_vnni: bool,
    /// AMX-TILE, AMX-BF16 and AMX-INT8, with the OS saving the tile state (XCR0 bits 17 and
    /// 18). Linux also wants a per-process permission before the tiles are used; detection
    /// does not ask for it (see [`Isa::request_amx`]).
    pub amx: bool,
    /// The CPU says "GenuineIntel" (CPUID leaf 0). MKL's reduced-precision GEMMs are fast only
    /// there: on an AMD EPYC with AVX-512 VNNI and BF16 they ran 7-16x (int8) and 2.2-2.5x
    /// (bf16) slower than our own tiles (see [`crate::cpu::CpuKernels::mkl_reduced_precision`]).
    pub intel: bool,
}

impl CpuFeatures {
    /// The features of this CPU, detected once per process. Detection only reads CPUID and
    /// XCR0: it changes nothing in the process.
    pub fn detect() -> Self {
        static FEATURES: std::sync::OnceLock<CpuFeatures> = std::sync::OnceLock::new();
        *FEATURES.get_or_init(detect)
    }

    /// The features, space-separated (for logs and benchmarks).
    pub fn describe(&self) -> String {
        let names = [
            (self.avx2, "avx2"),
            (self.fma, "fma"),
            (self.f16c, "f16c"),
            (self.avx512f, "avx512f"),
            (self.avx512bw, "avx512bw"),
            (self.avx512vl, "avx512vl"),
            (self.avx512dq, "avx512dq"),
            (self.avx512_bf16, "avx512bf16"),
            (self.avx512_vnni, "avx512vnni"),
            (self.amx, "amx"),
            (self.intel, "intel"),
        ];
        let found: Vec<&str> = names.iter().filter(|(f, _)| *f).map(|&(_, n)| n).collect();
        if found.is_empty() {
            "none".into()
        } else {
            found.join(" ")
        }
    }
}

/// The most a model's CPU kernels may use: a narrowing of what the CPU has, never more. For
/// users who must not have AMX requested for their process, and for tests and benchmarks that
/// prove the other paths on a capable machine. It narrows our own kernels; MKL and the `gemm`
/// crate choose their code by their own CPU detection (MKL's reduced-precision GEMMs are not
/// called when AMX is excluded on a CPU that has it, so that MKL never asks for AMX either).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum IsaLimit {
    /// Everything the CPU has, AMX included.
    #[default]
    Best,
    /// AVX-512 (with BF16 and VNNI where present), no AMX.
    Avx512,
    /// AVX2 and FMA, no AVX-512.
    Avx2,
    /// No extension: the portable kernels (plain Rust for the compiler's baseline).
    Portable,
}

impl IsaLimit {
    pub const ALL: [IsaLimit; 4] = [Self::Best, Self::Avx512, Self::Avx2, Self::Portable];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Best => "best",
            Self::Avx512 => "avx512",
            Self::Avx2 => "avx2",
            Self::Portable => "portable",
        }
    }
}

impl fmt::Display for IsaLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for IsaLimit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "best" | "auto" | "amx" => Ok(Self::Best),
            "avx512" => Ok(Self::Avx512),
            "avx2" => Ok(Self::Avx2),
            "portable" | "plain" | "none" => Ok(Self::Portable),
            other => Err(format!(
                "unknown CPU kernel set {other:?} (expected best, avx512, avx2 or portable)"
            )),
        }
    }
}

/// Vector width of the kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Level {
    Portable,
    /// [`Isa::AVX2_FEATURES`].
    Avx2,
    /// [`Isa::AVX512_FEATURES`].
    Avx512,
}

/// The instruction-set extensions one model's kernels run: detected, then narrowed. Private
/// fields: the only ways to get one are [`Isa::detect`] and [`Isa::portable`], and narrowing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Isa {
    level: Level,
    /// AVX-512 BF16 (implies the AVX-512 level).
    bf16: bool,
    /// AVX-512 VNNI (implies the AVX-512 level).
    vnni: bool,
    /// AMX usable by MKL's GEMMs (hardware, OS and, after [`Isa::request_amx`], permission).
    amx: bool,
    /// AMX tile instructions may run in our own kernels: `amx`, and this process was granted
    /// the tile state ([`Isa::request_amx`]). MKL asks for the permission itself; a tile
    /// instruction of ours without it would fault.
    tiles: bool,
}

impl Isa {
    /// What `#[target_feature]` code of the AVX-512 level may enable.
    pub const AVX512_FEATURES: &'static str = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c";
    /// What `#[target_feature]` code of the AVX2 level may enable.
    pub const AVX2_FEATURES: &'static str = "avx2,fma,f16c";

    /// This CPU's extensions, narrowed by `limit`. Has no side effect: AMX counts as present
    /// when the hardware and the OS support it, but products use it only after
    /// [`Isa::request_amx`].
    pub fn detect(limit: IsaLimit) -> Self {
        Self::from_features(&CpuFeatures::detect()).narrow(limit)
    }

    /// No extension at all.
    pub fn portable() -> Self {
        Self {
            level: Level::Portable,
            bf16: false,
            vnni: false,
            amx: false,
            tiles: false,
        }
    }

    /// The `Isa` of a CPU described by hand, for tests of the rules that read one (never for
    /// running kernels: only detection proves what the CPU has).
    #[cfg(test)]
    pub(crate) fn of_described_cpu(f: &CpuFeatures) -> Self {
        Self::from_features(f)
    }

    fn from_features(f: &CpuFeatures) -> Self {
        let avx2 = f.avx2 && f.fma && f.f16c;
        let avx512 = avx2 && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq;
        let level = if avx512 {
            Level::Avx512
        } else if avx2 {
            Level::Avx2
        } else {
            Level::Portable
        };
        Self {
            level,
            bf16: avx512 && f.avx512_bf16,
            vnni: avx512 && f.avx512_vnni,
            amx: f.amx,
            // Never from detection alone: only a granted request proves the permission.
            tiles: false,
        }
    }

    /// At most what `limit` allows.
    pub fn narrow(self, limit: IsaLimit) -> Self {
        let cap = match limit {
            IsaLimit::Best | IsaLimit::Avx512 => Level::Avx512,
            IsaLimit::Avx2 => Level::Avx2,
            IsaLimit::Portable => Level::Portable,
        };
        let level = self.level.min(cap);
        let avx512 = level == Level::Avx512;
        Self {
            level,
            bf16: self.bf16 && avx512,
            vnni: self.vnni && avx512,
            amx: self.amx && limit == IsaLimit::Best,
            tiles: self.tiles && limit == IsaLimit::Best,
        }
    }

    /// Every ISA this CPU can run, from the portable one up (for tests that cover each path).
    pub fn available() -> Vec<Isa> {
        let mut out: Vec<Isa> = Vec::new();
        for limit in IsaLimit::ALL.iter().rev() {
            let isa = Self::detect(*limit);
            if !out.contains(&isa) {
                out.push(isa);
            }
        }
        out
    }

    /// Asks the OS for the AMX tile state for this process (Linux 5.16+ requires it before
    /// the first tile instruction; MKL would ask on its own). Keeps AMX only when granted.
    /// A process-wide effect (documented in the README): called only at the load of a model
    /// whose products will run on AMX.
    pub fn request_amx(self) -> Self {
        let granted = self.amx && super::host::request_amx_permission();
        Self {
            amx: granted,
            tiles: granted,
            ..self
        }
    }

    /// AVX2, FMA and F16C: code enabling [`Isa::AVX2_FEATURES`] may run.
    pub fn avx2(self) -> bool {
        self.level >= Level::Avx2
    }

    /// AVX-512 F, BW, VL and DQ: code enabling [`Isa::AVX512_FEATURES`] may run.
    pub fn avx512(self) -> bool {
        self.level >= Level::Avx512
    }

    /// [`Isa::avx512`] and AVX-512 BF16.
    pub fn avx512_bf16(self) -> bool {
        self.bf16
    }

    /// [`Isa::avx512`] and AVX-512 VNNI.
    pub fn avx512_vnni(self) -> bool {
        self.vnni
    }

    /// AMX tiles for MKL's bf16 and int8 GEMMs.
    pub fn amx(self) -> bool {
        self.amx
    }

    /// AMX-TILE and AMX-INT8 instructions of our own kernels may run: the CPU and the OS
    /// support them and [`Isa::request_amx`] was granted the tile state for this process.
    pub fn amx_tiles(self) -> bool {
        self.tiles
    }

    /// A short name: `portable`, `avx2`, `avx512`, with `+bf16`, `+vnni`, `+amx`.
    pub fn name(self) -> String {
        let mut s = String::from(match self.level {
            Level::Portable => "portable",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        });
        for (on, ext) in [
            (self.bf16, "+bf16"),
            (self.vnni, "+vnni"),
            (self.amx, "+amx"),
        ] {
            if on {
                s.push_str(ext);
            }
        }
        s
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

#[cfg(target_arch = "x86_64")]
fn detect() -> CpuFeatures {
    use std::arch::is_x86_feature_detected as has;
    CpuFeatures {
        avx2: has!("avx2"),
        fma: has!("fma"),
        f16c: has!("f16c"),
        avx512f: has!("avx512f"),
        avx512bw: has!("avx512bw"),
        avx512vl: has!("avx512vl"),
        avx512dq: has!("avx512dq"),
        avx512_bf16: has!("avx512bf16"),
        avx512_vnni: has!("avx512vnni"),
        amx: amx_supported(),
        intel: vendor_is_intel(),
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> CpuFeatures {
    CpuFeatures::default()
}

/// CPUID leaf 7 EDX: AMX-BF16 (bit 22), AMX-TILE (24), AMX-INT8 (25); XCR0 bits 17-18 (tile
/// config and data enabled by the OS).
#[cfg(target_arch = "x86_64")]
fn amx_supported() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    if __cpuid(0).eax < 7 {
        return false;
    }
    let leaf7 = __cpuid_count(7, 0);
    let bit = |b: u32| leaf7.edx & (1 << b) != 0;
    if !(bit(22) && bit(24) && bit(25)) {
        return false;
    }
    let osxsave = __cpuid(1).ecx & (1 << 27) != 0;
    // SAFETY: xgetbv is available when OSXSAVE is set.
    osxsave && unsafe { xgetbv0() } & (0b11 << 17) == (0b11 << 17)
}

/// CPUID leaf 0: the vendor string in EBX, EDX, ECX.
#[cfg(target_arch = "x86_64")]
fn vendor_is_intel() -> bool {
    let leaf0 = std::arch::x86_64::__cpuid(0);
    let mut vendor = [0u8; 12];
    vendor[..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
    vendor[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
    vendor[8..].copy_from_slice(&leaf0.ecx.to_le_bytes());
    &vendor == b"GenuineIntel"
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "xsave")]
unsafe fn xgetbv0() -> u64 {
    std::arch::x86_64::_xgetbv(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrowing_never_adds_and_each_limit_caps_its_level() {
        let full = Isa {
            level: Level::Avx512,
            bf16: true,
            vnni: true,
            amx: true,
            tiles: true,
        };
        assert_eq!(full.narrow(IsaLimit::Best), full);
        let no_amx = full.narrow(IsaLimit::Avx512);
        assert!(no_amx.avx512_bf16() && !no_amx.amx() && !no_amx.amx_tiles());
        let avx2 = full.narrow(IsaLimit::Avx2);
        assert!(avx2.avx2() && !avx2.avx512() && !avx2.avx512_bf16() && !avx2.avx512_vnni());
        assert!(!avx2.amx() && !avx2.amx_tiles());
        let portable = full.narrow(IsaLimit::Portable);
        assert_eq!(portable, Isa::portable());
        // A plain CPU stays plain whatever the limit.
        for limit in IsaLimit::ALL {
            assert_eq!(Isa::portable().narrow(limit), Isa::portable());
        }
        let detected = Isa::detect(IsaLimit::Best);
        // Detection has no side effect, so it never proves the tile permission.
        assert!(!detected.amx_tiles());
        for isa in Isa::available() {
            assert!(isa.level <= detected.level);
        }
        assert_eq!(Isa::available()[0], Isa::portable());
    }

    #[test]
    fn avx512_requires_every_feature_its_code_enables() {
        let mut f = CpuFeatures {
            avx2: true,
            fma: true,
            f16c: true,
            avx512f: true,
            avx512bw: true,
            avx512vl: true,
            avx512dq: true,
            avx512_bf16: true,
            avx512_vnni: true,
            amx: false,
            intel: false,
        };
        assert!(Isa::from_features(&f).avx512_bf16());
        f.avx512vl = false;
        let isa = Isa::from_features(&f);
        assert!(!isa.avx512() && isa.avx2() && !isa.avx512_bf16() && !isa.avx512_vnni());
        f.fma = false;
        assert_eq!(Isa::from_features(&f), Isa::portable());
    }

    #[test]
    fn limits_parse_from_their_names() {
        for limit in IsaLimit::ALL {
            assert_eq!(limit.as_str().parse::<IsaLimit>(), Ok(limit));
        }
        assert!("sse9".parse::<IsaLimit>().is_err());
    }
}
