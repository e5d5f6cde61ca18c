//! The CUDA kernels' own source (`cuda/*.cu`), compiled for the host with a C++20 compiler
//! against a small emulation of the CUDA built-ins (`emu/`: real threads per block, barriers
//! for `__syncthreads` and warp shuffles), run against the CPU twins. This checks the kernels'
//! indexing, barrier placement and summation order on every CI run, without nvcc or a GPU:
//!
//! * preprocessing: uint8 output byte-identical and f32 output bit-identical to the twin on
//!   random frames (every format, odd sizes, padded strides, random taps, crops with padding);
//! * compression: attention weights and pooled vectors bit-identical to the twin on odd shapes
//!   with N > 256 and W > 256: the same summation order, and both sides use the C library's
//!   `expf` (Rust's `f32::exp` calls it) and a correctly rounded fma. (On the GPU, `expf` may
//!   differ by an ulp or two; kernels/gpu-check.sh uses 1e-5 there.)
//!
//! Needs a C++ compiler (`CXX`, `g++`, `c++`). Without one the tests fail under `CI=true` (CI
//! installs g++; a silent skip there would hide the kernels going unchecked) and print a
//! SKIPPED line per test elsewhere. `LLAMAVID_SKIP_KERNEL_EMU=1` skips them explicitly (also
//! printed).

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use llamavid_kernels::compress::{cpu as compress_twin, CompressShape};
use llamavid_kernels::preprocess::{cpu as twin, KernelArgs};
use llamavid_kernels::{
    AxisTaps, Normalization, Plane, PreprocessParams, SourceFormat, YuvCoeffs, PRECISION_BITS,
};

/// The emulator binary, built once per test run; `None` when no compiler is available.
fn emulator() -> Option<&'static PathBuf> {
    static EMU: OnceLock<Option<PathBuf>> = OnceLock::new();
    EMU.get_or_init(|| {
        if std::env::var_os("LLAMAVID_SKIP_KERNEL_EMU").is_some_and(|v| v == "1") {
            eprintln!("LLAMAVID_SKIP_KERNEL_EMU=1: kernel emulation skipped");
            return None;
        }
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("llamavid-kernel-emulator");
        let candidates: Vec<String> = std::env::var("CXX")
            .into_iter()
            .chain(["g++".to_string(), "c++".to_string()])
            .collect();
        for cxx in candidates {
            let result = Command::new(&cxx)
                .args([
                    "-std=c++20",
                    "-O1",
                    "-pthread",
                    "-Wall",
                    "-Werror=return-type",
                ])
                .arg("-I")
                .arg(dir.join("emu/include"))
                .arg(dir.join("emu/emulate.cpp"))
                .arg("-o")
                .arg(&out)
                .output();
            match result {
                Err(_) => continue, // not installed
                Ok(o) if o.status.success() => return Some(out),
                Ok(o) => panic!(
                    "{cxx} could not compile the kernels for emulation:\n{}",
                    String::from_utf8_lossy(&o.stderr)
                ),
            }
        }
        let in_ci = matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1"));
        assert!(
            !in_ci,
            "CI=true but no C++ compiler (CXX, g++, c++) is installed: the CUDA kernels cannot be \
             emulated (install g++)"
        );
        None
    })
    .as_ref()
}

/// True (after a loud line on stderr) when the emulator cannot run here.
fn skipped(test: &str) -> bool {
    if emulator().is_some() {
        return false;
    }
    // Straight to stderr, past libtest's capture of `eprintln!`: a skip must be seen.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: no C++ compiler (CXX, g++, c++) or LLAMAVID_SKIP_KERNEL_EMU=1; the CUDA \
         kernels were NOT checked"
    );
    true
}

fn run_emulator(input: &[u8], output_len: usize) -> Vec<u8> {
    let mut child = Command::new(emulator().unwrap())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("emulator starts");
    let mut stdin = child.stdin.take().unwrap();
    let data = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().expect("emulator runs");
    writer.join().unwrap().expect("input written");
    assert!(
        out.status.success(),
        "emulator failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), output_len, "emulator output size");
    out.stdout
}

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
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % (hi - lo + 1) as u64) as i64
    }
    fn signed(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Random valid taps: starts and counts inside the source, weights whose magnitudes sum to at
/// most 2.0 in fixed point (so no i32 accumulation can overflow), negative lobes included.
fn random_taps(rng: &mut Rng, in_size: usize, out_size: usize) -> AxisTaps {
    if rng.below(4) == 0 && in_size == out_size {
        return AxisTaps::identity(in_size);
    }
    let ksize = 1 + rng.below(in_size.min(9));
    let one = 1i64 << PRECISION_BITS;
    let mut t = AxisTaps {
        in_size,
        ksize,
        starts: Vec::new(),
        counts: Vec::new(),
        weights: vec![0; out_size * ksize],
    };
    for i in 0..out_size {
        let count = 1 + rng.below(ksize);
        let start = rng.below(in_size - count + 1);
        t.starts.push(start);
        t.counts.push(count);
        let bound = 2 * one / count as i64;
        for k in 0..count {
            t.weights[i * ksize + k] = rng.range(-bound / 4, bound) as i32;
        }
    }
    t
}

fn random_params(
    rng: &mut Rng,
    format: SourceFormat,
    w: usize,
    h: usize,
) -> (PreprocessParams, Vec<u8>) {
    let mut planes = Vec::new();
    let mut end = rng.below(13);
    for i in 0..format.plane_count() {
        let (row_bytes, rows) = format.plane_extent(i, w, h);
        let stride = row_bytes + rng.below(9);
        planes.push(Plane {
            offset: end,
            stride,
        });
        end += stride * rows + rng.below(7);
    }
    let src: Vec<u8> = (0..end).map(|_| rng.next() as u8).collect();
    let rw = 1 + rng.below(2 * w + 3);
    let rh = 1 + rng.below(2 * h + 3);
    let rw = if rng.below(3) == 0 { w } else { rw };
    let rh = if rng.below(3) == 0 { h } else { rh };
    let ow = 1 + rng.below(rw + 4);
    let oh = 1 + rng.below(rh + 4);
    let p = PreprocessParams {
        format,
        width: w,
        height: h,
        planes,
        yuv: YuvCoeffs {
            y_offset: [0, 16][rng.below(2)],
            y_gain: 76309,
            r_v: 104597,
            g_u: 25675,
            g_v: 53279,
            b_u: 132201,
        },
        horizontal: random_taps(rng, w, rw),
        vertical: random_taps(rng, h, rh),
        crop_left: PreprocessParams::centre_crop_offset(rw, ow) + rng.range(-1, 1),
        crop_top: PreprocessParams::centre_crop_offset(rh, oh) + rng.range(-1, 1),
        out_width: ow,
        out_height: oh,
        normalization: Normalization {
            rescale: Some(1.0 / 255.0),
            mean_std: Some(([0.48, 0.45, 0.40], [0.26, 0.26, 0.27])),
        },
    };
    (p, src)
}

fn preprocess_request(p: &PreprocessParams, src: &[u8], kind: u32) -> Vec<u8> {
    let used = p.used_bytes().unwrap();
    let args: KernelArgs = p.kernel_args(used.start);
    let src = &src[used];
    let taps = p.packed_taps();
    let table: Vec<f32> = p
        .normalization
        .value_table()
        .iter()
        .flatten()
        .copied()
        .collect();
    let mut req = vec![b'P'];
    req.extend(kind.to_le_bytes());
    // SAFETY: KernelArgs is #[repr(C)] plain integers without padding (144 bytes).
    let raw = unsafe {
        std::slice::from_raw_parts(
            (&args as *const KernelArgs).cast::<u8>(),
            std::mem::size_of::<KernelArgs>(),
        )
    };
    req.extend_from_slice(raw);
    req.extend((taps.len() as u32).to_le_bytes());
    taps.iter().for_each(|t| req.extend(t.to_le_bytes()));
    table.iter().for_each(|t| req.extend(t.to_le_bytes()));
    req.extend((src.len() as u64).to_le_bytes());
    req.extend_from_slice(src);
    req
}

#[test]
fn emulated_preprocess_kernel_matches_twin() {
    if skipped("emulated_preprocess_kernel_matches_twin") {
        return;
    }
    let mut rng = Rng(2024);
    let mut frames = 0;
    for &(w, h) in &[(1, 1), (2, 1), (3, 5), (8, 3), (17, 9), (31, 47), (64, 33)] {
        for format in SourceFormat::ALL {
            for _ in 0..3 {
                let (p, src) = random_params(&mut rng, format, w, h);
                p.validate(src.len()).unwrap();
                let want_u8 = twin::resample_u8(&p, &src).unwrap();
                let got_u8 = run_emulator(&preprocess_request(&p, &src, 0), want_u8.len());
                assert!(
                    got_u8 == want_u8,
                    "{format:?} {w}x{h}: uint8 output differs ({p:?})"
                );
                let want = twin::preprocess(&p, &src).unwrap();
                let got = run_emulator(&preprocess_request(&p, &src, 1), want.len() * 4);
                let got: Vec<u32> = got
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
                    .collect();
                let want: Vec<u32> = want.iter().map(|v| v.to_bits()).collect();
                assert!(got == want, "{format:?} {w}x{h}: f32 output differs");
                frames += 1;
            }
        }
    }
    eprintln!("{frames} random frames: emulated kernel identical to the twin");
}

#[test]
fn emulated_compress_kernels_match_twin() {
    if skipped("emulated_compress_kernels_match_twin") {
        return;
    }
    let mut rng = Rng(99);
    for (b, q, n, w) in [
        (1, 1, 1, 1),
        (3, 7, 17, 33),
        (2, 5, 300, 70),
        (1, 3, 41, 300),
    ] {
        let s = CompressShape {
            batch: b,
            queries: q,
            patches: n,
            width: w,
        };
        let scale = (w as f64).powf(-0.5) as f32;
        let mut gen =
            |len: usize, amp: f32| (0..len).map(|_| rng.signed() * amp).collect::<Vec<f32>>();
        let tq = gen(b * q * w, 2.0);
        let keys = gen(b * n * w, 2.0);
        let patches = gen(b * n * w, 3.0);
        let mut req = vec![b'C'];
        for v in [b, q, n, w] {
            req.extend((v as i32).to_le_bytes());
        }
        req.extend(scale.to_le_bytes());
        for v in tq.iter().chain(&keys).chain(&patches) {
            req.extend(v.to_le_bytes());
        }
        let out = run_emulator(&req, 4 * (b * q * n + 2 * b * w));
        let out: Vec<f32> = out
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let (attn, rest) = out.split_at(b * q * n);
        let (context, content) = rest.split_at(b * w);

        let want_attn = compress_twin::attention(&tq, &keys, s, scale);
        let (want_context, want_content) = compress_twin::pool(&want_attn, &patches, s);
        for (what, got, want) in [
            ("attention", attn, &want_attn[..]),
            ("context", context, &want_context[..]),
            ("content", content, &want_content[..]),
        ] {
            for (i, (g, e)) in got.iter().zip(want).enumerate() {
                assert!(
                    g.to_bits() == e.to_bits(),
                    "B={b} Q={q} N={n} W={w} {what}[{i}]: emulated {g:e} vs twin {e:e} \
                     (the kernel's summation order no longer matches the twin's)"
                );
            }
        }
        eprintln!("B={b} Q={q} N={n} W={w}: emulated kernels bit-identical to the twin");
    }
}
