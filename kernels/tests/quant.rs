//! The GGUF block kernels (`cpu::quant`) against candle's reading of the same blocks: our
//! decoding of every block type equals candle's dequantization exactly, and the product equals
//! the f64 product of those weights with the activations as ggml quantizes them (8 bits per
//! 32 or 256 values), i.e. only the activation rounding separates it from the f32 product.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use llamavid_kernels::cpu::quant::{BlockType, QuantLinear};
use llamavid_kernels::cpu::Epilogue;

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
        let ours = QuantLinear::new(b, n, k, q.data().unwrap().into_owned()).unwrap();
        let theirs: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let decoded = ours.dequantize();
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
        let layer = QuantLinear::new(b, n, k, q.data().unwrap().into_owned()).unwrap();
        let wd = layer.dequantize();
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
