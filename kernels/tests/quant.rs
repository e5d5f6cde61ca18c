//! The GGUF block kernels (`cpu::quant`) against candle's reading of the same blocks: our
//! decoding of every block type equals candle's dequantization exactly, and the product equals
//! the f64 product of those weights with the activations as ggml quantizes them (8 bits per
//! 32 or 256 values), i.e. only the activation rounding separates it from the f32 product;
//! and every instruction set this CPU runs (portable, AVX2, AVX-512) gives the same bits.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use llamavid_kernels::cpu::quant::BlockType;
use llamavid_kernels::cpu::{CpuKernels, CpuLinear, Epilogue, Isa, IsaLimit, ProductPath};

/// A layer on the blocks of `q` with the kernels of `isa`.
fn layer(b: BlockType, q: &QTensor, (n, k): (usize, usize), isa: Isa) -> CpuLinear {
    let data = q.data().unwrap().into_owned();
    CpuLinear::ggml(b, n, k, data, None, CpuKernels::new(isa)).unwrap()
}

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
        })
        .collect()
}

const TYPES: [(GgmlDType, BlockType); 8] = [
    (GgmlDType::Q4_0, BlockType::Q4_0),
    (GgmlDType::Q4_1, BlockType::Q4_1),
    (GgmlDType::Q5_0, BlockType::Q5_0),
    (GgmlDType::Q5_1, BlockType::Q5_1),
    (GgmlDType::Q8_0, BlockType::Q8_0),
    (GgmlDType::Q4K, BlockType::Q4K),
    (GgmlDType::Q5K, BlockType::Q5K),
    (GgmlDType::Q6K, BlockType::Q6K),
];

#[test]
fn block_decoding_equals_candles_dequantization() {
    let (n, k) = (48, 512);
    for (g, b) in TYPES {
        let w = Tensor::from_vec(random(n * k, 7), (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, g).unwrap();
        let ours = layer(b, &q, (n, k), Isa::portable());
        let theirs: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let decoded = ours.dequantized_blocks().unwrap();
        let worst = decoded
            .iter()
            .zip(&theirs)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            worst <= 1e-6,
            "{b:?}: decoding differs from candle's by {worst:e}"
        );
    }
}

#[test]
fn products_follow_the_quantized_activations() {
    let (m, n, k) = (5, 40, 512);
    let x = random(m * k, 11);
    for (g, b) in TYPES {
        let w = Tensor::from_vec(random(n * k, 3), (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, g).unwrap();
        let layer = layer(b, &q, (n, k), Isa::detect(IsaLimit::Best));
        assert!(matches!(layer.path(m), ProductPath::GgmlBlocks(_)));
        let wd = layer.dequantized_blocks().unwrap();
        let mut out = vec![0f32; m * n];
        layer.forward_with(&x, m, &mut out, Epilogue::Store);
        // The f32 product, and how far 8-bit activations may move it: per value, half a step
        // of its block's scale (max|x| / 127) times |w|.
        let block = if matches!(b, BlockType::Q4K | BlockType::Q5K | BlockType::Q6K) {
            256
        } else {
            32
        };
        for i in 0..m {
            let xr = &x[i * k..(i + 1) * k];
            for j in 0..n {
                let wr = &wd[j * k..(j + 1) * k];
                let exact: f64 = xr.iter().zip(wr).map(|(a, b)| *a as f64 * *b as f64).sum();
                let slack: f64 = xr
                    .chunks(block)
                    .zip(wr.chunks(block))
                    .map(|(xb, wb)| {
                        let step = xb.iter().fold(0f32, |a, v| a.max(v.abs())) as f64 / 127.0;
                        wb.iter().map(|w| 0.5 * step * w.abs() as f64).sum::<f64>()
                    })
                    .sum();
                let got = out[i * n + j] as f64;
                assert!(
                    (got - exact).abs() <= slack * 1.01 + 1e-4,
                    "{b:?} ({i}, {j}): {got} vs {exact} (activation rounding allows {slack})"
                );
            }
        }
        // Accumulate adds to what is there.
        let mut acc = vec![1f32; m * n];
        layer.forward_with(&x, m, &mut acc, Epilogue::Accumulate);
        for (a, o) in acc.iter().zip(&out) {
            assert!(
                (a - 1.0 - o).abs() <= 1e-5 * o.abs().max(1.0),
                "{b:?} accumulate"
            );
        }
    }
}

#[test]
fn every_instruction_set_gives_the_same_bits() {
    // 13 rows take every register tile of the x86 kernels (8 × 1, 4 × 2, 1 × 8), 3 rows the
    // 2 × 4 one; 33 columns leave a column short of a tile.
    for m in [1, 3, 13] {
        same_bits_on_every_isa(m, 33, 768);
    }
}

fn same_bits_on_every_isa(m: usize, n: usize, k: usize) {
    let mut x = random(m * k, 5);
    // A block of zeros, and one whose values·127/max land exactly on halves (rounded to even).
    x[..32].fill(0.0);
    if m > 1 {
        let ties = [127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5];
        x[k..k + ties.len()].copy_from_slice(&ties);
    }
    let isas = Isa::available();
    for level in ["AVX2", "AVX-512"] {
        let have = isas.iter().any(|i| match level {
            "AVX2" => i.avx2(),
            _ => i.avx512(),
        });
        if !have {
            eprintln!("skipped: ggml block kernels for {level}: this CPU lacks it");
        }
    }
    for (g, b) in TYPES {
        let w = Tensor::from_vec(random(n * k, 9), (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, g).unwrap();
        let outputs: Vec<(Isa, Vec<f32>)> = isas
            .iter()
            .map(|&isa| {
                let l = layer(b, &q, (n, k), isa);
                assert_eq!(l.path(m), ProductPath::GgmlBlocks(isa));
                (isa, l.forward(&x, m))
            })
            .collect();
        let (first_isa, first) = &outputs[0];
        for (isa, out) in &outputs[1..] {
            let same = out
                .iter()
                .zip(first)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{b:?}, {m} rows: {isa} differs from {first_isa}");
        }
    }
}

#[test]
fn bias_and_gelu_apply_after_the_block_product() {
    let (m, n, k) = (2, 8, 256);
    let x = random(m * k, 21);
    let w = Tensor::from_vec(random(n * k, 22), (n, k), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
    let kernels = CpuKernels::new(Isa::detect(IsaLimit::Best));
    let plain = CpuLinear::ggml(
        BlockType::Q8_0,
        n,
        k,
        q.data().unwrap().into_owned(),
        None,
        kernels,
    );
    let bias: Vec<f32> = (0..n).map(|j| j as f32 - 3.5).collect();
    let biased = CpuLinear::ggml(
        BlockType::Q8_0,
        n,
        k,
        q.data().unwrap().into_owned(),
        Some(bias.clone()),
        kernels,
    );
    let (plain, biased) = (plain.unwrap(), biased.unwrap());
    let y = plain.forward(&x, m);
    let yb = biased.forward(&x, m);
    for (i, (a, b)) in y.iter().zip(&yb).enumerate() {
        assert!((a + bias[i % n] - b).abs() <= 1e-5, "bias at {i}");
    }
    let mut g = vec![0f32; m * n];
    biased.forward_with(&x, m, &mut g, Epilogue::Gelu);
    for (i, (&b, &g)) in yb.iter().zip(&g).enumerate() {
        let want = 0.5 * b * (1.0 + erf(b / std::f32::consts::SQRT_2));
        assert!((want - g).abs() <= 1e-4, "gelu at {i}: {g} vs {want}");
    }
    // Wrong sizes are an error, not a panic.
    let short = CpuLinear::ggml(BlockType::Q8_0, n, k, vec![0; 10], None, kernels);
    assert!(short.is_err());
    let ragged = CpuLinear::ggml(BlockType::Q4K, n, 100, vec![0; 10], None, kernels);
    assert!(ragged.is_err());
}

/// erf by Abramowitz-Stegun 7.1.26 in f64 (|error| < 1.5e-7): enough for a GELU check.
fn erf(x: f32) -> f32 {
    let x = x as f64;
    let t = 1.0 / (1.0 + 0.3275911 * x.abs());
    let poly = t
        * (0.254829592
            + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    let y = 1.0 - poly * (-x * x).exp();
    (if x < 0.0 { -y } else { y }) as f32
}
