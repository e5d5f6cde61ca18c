//! Choosing the next token from logits: greedy, or temperature with nucleus (top-p) sampling
//! from a seeded generator so that a caption can be reproduced.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How captions are decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    pub max_new_tokens: usize,
    /// 0 (or below 1e-3, as the reference web worker treats it) means greedy.
    pub temperature: f64,
    /// Nucleus mass kept when sampling; 1.0 keeps every token.
    pub top_p: f64,
    pub seed: u64,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl GenerationParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature < 1e-3
    }
}

#[derive(Clone)]
pub struct Sampler {
    temperature: f64,
    top_p: f64,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: &GenerationParams) -> Self {
        Self {
            temperature: if params.is_greedy() {
                0.0
            } else {
                params.temperature
            },
            top_p: params.top_p.clamp(0.0, 1.0),
            rng: StdRng::seed_from_u64(params.seed),
        }
    }

    /// Picks a token id from one row of logits.
    pub fn next(&mut self, logits: &[f32]) -> u32 {
        if self.temperature == 0.0 {
            return argmax(logits);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let inv_t = (1.0 / self.temperature) as f32;
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) * inv_t).exp()))
            .collect();
        // Highest first; ties broken by the lower id so the order is deterministic.
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let total: f32 = probs.iter().map(|p| p.1).sum();
        // Keep the smallest prefix whose mass reaches top_p (always at least one token).
        let mut kept = 0;
        let mut mass = 0.0;
        for &(_, p) in &probs {
            kept += 1;
            mass += p / total;
            if f64::from(mass) >= self.top_p {
                break;
            }
        }
        probs.truncate(kept);
        let kept_total: f32 = probs.iter().map(|p| p.1).sum();
        let mut target = self.rng.random::<f32>() * kept_total;
        for &(id, p) in &probs {
            if target < p {
                return id;
            }
            target -= p;
        }
        probs[probs.len() - 1].0
    }
}

/// Index of the largest logit; the first one on ties, as `torch.argmax` does.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f64, top_p: f64, seed: u64) -> GenerationParams {
        GenerationParams {
            max_new_tokens: 1,
            temperature,
            top_p,
            seed,
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(&params(0.0, 1.0, 0));
        assert_eq!(s.next(&[0.1, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn tiny_top_p_is_greedy() {
        let mut s = Sampler::new(&params(1.0, 1e-6, 7));
        for _ in 0..20 {
            assert_eq!(s.next(&[0.0, 2.0, 1.9]), 1);
        }
    }

    #[test]
    fn same_seed_same_tokens_and_sampling_explores() {
        let logits = [1.0, 1.1, 0.9, 1.05];
        let draw = |seed| {
            let mut s = Sampler::new(&params(1.0, 1.0, seed));
            (0..64).map(|_| s.next(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        let distinct: std::collections::BTreeSet<u32> = draw(3).into_iter().collect();
        assert!(distinct.len() > 1, "sampling at temperature 1 never varied");
    }

    #[test]
    fn top_p_excludes_the_tail() {
        // Token 2 holds almost no mass: with top_p 0.9 it must never be drawn.
        let logits = [5.0, 5.0, -20.0];
        let mut s = Sampler::new(&params(1.0, 0.9, 1));
        for _ in 0..200 {
            assert_ne!(s.next(&logits), 2);
        }
    }
}
