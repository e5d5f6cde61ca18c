//! Timing of single linear-layer products at the cpu-bench model's shapes (not a test): the
//! decode step (1 row; 2, 4, 8 and 16 rows for batched decoding), a prefill (115 rows; 460 for
//! four at once), one frame (257 rows) and batches of 2 and 8 frames (514, 2056 rows), per
//! precision, on 2 threads, under an ISA limit. For comparing kernels without the whole model:
//!
//! ```text
//! [MKL_ENABLE_INSTRUCTIONS=AVX2] cargo bench -p llamavid-kernels [--features mkl] \
//!     --bench products -- [--isa avx2] [--threads 2] [--cold 64] [--row-block 320] \
//!     [--only decode,decode2,decode4,decode8,decode16,prefill,prefill4,frame,batch2,batch8,
//!     attention,decode-plain,decode4-plain,prefill-plain,frame-plain] \
//!     [--dtypes f32,bf16,int8]
//! ```
//!
//! `--cold COPIES` cycles through that many copies of each layer, so that (with copies whose
//! total exceeds the last-level cache) every product reads its weights from memory, as a
//! decode step of the whole model does.
//!
//! Prints the fastest of 5 runs after a warm-up (the least disturbed by other processes on a
//! shared machine), and GMAC/s (multiply-adds per second).

use std::time::Instant;

use llamavid_kernels::cpu::{CpuKernels, CpuLinear, Isa, IsaLimit, WeightType};

fn data(len: usize, seed: u32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}

/// How a case's weights are laid out.
#[derive(Clone, Copy)]
enum Layout {
    /// As the model lays out the language model's (`packed_where_faster`).
    Model,
    /// As the model lays out the vision tower's (`packed_for` one frame's 257 rows).
    Vision,
    /// As quantised (no MKL packing).
    Plain,
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut limit, mut threads, mut only) = (IsaLimit::Avx2, 2usize, None::<String>);
    let mut copies = 1usize;
    let mut kinds = vec![WeightType::F32, WeightType::Bf16, WeightType::Int8];
    let mut row_block = CpuKernels::DEFAULT_ROW_BLOCK;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--isa" => {
                limit = args
                    .next()
                    .expect("--isa LIMIT")
                    .parse()
                    .expect("an ISA limit")
            }
            "--threads" => threads = args.next().expect("--threads N").parse().expect("a count"),
            "--only" => only = args.next(),
            "--row-block" => {
                row_block = args
                    .next()
                    .expect("--row-block ROWS")
                    .parse()
                    .expect("a count")
            }
            "--cold" => {
                copies = args
                    .next()
                    .expect("--cold COPIES")
                    .parse()
                    .expect("a count")
            }
            "--dtypes" => {
                kinds = args
                    .next()
                    .expect("--dtypes f32,bf16,int8")
                    .split(',')
                    .map(|d| match d {
                        "f32" => WeightType::F32,
                        "bf16" => WeightType::Bf16,
                        "int8" => WeightType::Int8,
                        other => panic!("unknown dtype {other} (f32, bf16, int8)"),
                    })
                    .collect()
            }
            // cargo bench passes --bench to every bench binary.
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    // As a model load does: AMX permission asked for where the limit allows AMX (our AMX
    // kernels run only once it is granted).
    let isa = Isa::detect(limit).request_amx();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    println!(
        "isa {isa}, {threads} threads, mkl {}",
        llamavid_kernels::cpu::HAS_MKL
    );
    // (name, rows, out features, in features, weights' layout): the LLM's MLP up/gate and
    // down, EVA's MLP, their weights laid out as the model lays them out (`Layout::Model`:
    // `packed_for` for the vision tower's, `packed_where_faster` for the LLM's), and a few as
    // quantised (`Layout::Plain`), for comparison.
    let cases = [
        ("decode", 1, 5632, 2048, Layout::Model),
        ("decode", 1, 2048, 5632, Layout::Model),
        ("decode-plain", 1, 5632, 2048, Layout::Plain),
        // A decode step of 2, 4 and 8 sequences together (the shared scheduler's batch).
        ("decode2", 2, 5632, 2048, Layout::Model),
        ("decode2", 2, 2048, 5632, Layout::Model),
        ("decode4", 4, 5632, 2048, Layout::Model),
        ("decode4", 4, 2048, 5632, Layout::Model),
        ("decode4-plain", 4, 5632, 2048, Layout::Plain),
        ("decode8", 8, 5632, 2048, Layout::Model),
        ("decode8", 8, 2048, 5632, Layout::Model),
        ("decode16", 16, 5632, 2048, Layout::Model),
        ("decode16", 16, 2048, 5632, Layout::Model),
        ("prefill", 115, 5632, 2048, Layout::Model),
        ("prefill", 115, 2048, 5632, Layout::Model),
        ("prefill-plain", 115, 5632, 2048, Layout::Plain),
        // Four prefills in one step (four captions due at once).
        ("prefill4", 460, 5632, 2048, Layout::Model),
        ("prefill4", 460, 2048, 5632, Layout::Model),
        ("frame", 257, 6144, 1408, Layout::Vision),
        ("frame", 257, 1408, 6144, Layout::Vision),
        ("frame-plain", 257, 6144, 1408, Layout::Plain),
        ("batch2", 514, 6144, 1408, Layout::Vision),
        ("batch8", 2056, 6144, 1408, Layout::Vision),
    ];
    pool.install(|| {
        for (name, m, n, k, layout) in cases {
            if only
                .as_deref()
                .is_some_and(|o| !o.split(',').any(|x| x == name))
            {
                continue;
            }
            let w = data(n * k, 1);
            let x = data(m * k, 2);
            let bias = data(n, 3);
            let mut line = format!("{name:8} m={m:5} n={n:5} k={k:5}:");
            // Ratios are to the first dtype timed (f32 unless --dtypes says otherwise).
            let mut first_time = None;
            for &kind in &kinds {
                let kernels = CpuKernels::new(isa).with_row_block(row_block);
                let layers: Vec<_> = (0..copies)
                    .map(|_| {
                        let layer =
                            CpuLinear::from_f32(kind, &w, n, k, Some(bias.clone()), kernels);
                        match layout {
                            Layout::Model => layer.packed_where_faster(),
                            Layout::Vision => layer.packed_for(257),
                            Layout::Plain => layer,
                        }
                    })
                    .collect();
                let layer = &layers[0];
                let mut out = vec![0f32; m * n];
                let reps = if m <= 16 { 50 } else { 5 };
                let mut times = Vec::new();
                for r in 0..=reps {
                    let layer = &layers[r % copies];
                    let t = Instant::now();
                    layer.forward_into(&x, m, &mut out);
                    if r > 0 {
                        times.push(t.elapsed().as_secs_f64());
                    }
                }
                let t = times.into_iter().fold(f64::INFINITY, f64::min);
                let gmacs = (m * n * k) as f64 / t / 1e9;
                let ratio = first_time.map_or(String::new(), |f: f64| format!(" {:.2}x", t / f));
                first_time.get_or_insert(t);
                line += &format!(
                    "  {} {:8.3} ms {:6.1} GMAC/s{ratio} [{}]",
                    kind.as_str(),
                    t * 1e3,
                    gmacs,
                    layer.path(m).describe()
                );
            }
            println!("{line}");
        }
        if only
            .as_deref()
            .is_none_or(|o| o.split(',').any(|x| x == "attention"))
        {
            vision_attention(isa);
        }
    });
}

/// The vision tower's self-attention (both products and the softmax) for a batch of 8
/// frames, per frame and block, in f32 and (where the CPU multiplies bf16 natively) bf16.
fn vision_attention(isa: Isa) {
    use llamavid_kernels::cpu::vit::{attention, AttentionShape};
    let shape = AttentionShape {
        batch: 8,
        tokens: 257,
        width: 1408,
        heads: 16,
        scale: 88f32.powf(-0.5),
    };
    let qkv = data(shape.batch * shape.tokens * 3 * shape.width, 4);
    let mut out = vec![0f32; shape.batch * shape.tokens * shape.width];
    let mut line = format!(
        "{:8} batch={} heads={}:",
        "attention", shape.batch, shape.heads
    );
    for bf16 in [false, true] {
        let mut times = Vec::new();
        for r in 0..=5 {
            let t = Instant::now();
            attention(isa, &qkv, shape, bf16, &mut out);
            if r > 0 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        let t = times.into_iter().fold(f64::INFINITY, f64::min) / shape.batch as f64;
        line += &format!(
            "  {} {:7.3} ms a frame",
            if bf16 { "bf16" } else { "f32" },
            t * 1e3
        );
    }
    println!("{line}");
}
