//! Choosing the next token from logits: greedy, temperature, top-k, top-p and
//! repetition penalty, as transformers' logits processors apply them.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// Sampling settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// Softmax temperature; 0 is greedy. Default 0.
    pub temperature: f32,
    /// Nucleus mass to keep, in (0, 1]; 1 disables it. Default 1.
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 disables it. Default 0.
    pub top_k: usize,
    /// Divide positive (multiply negative) logits of tokens already seen; 1 disables it.
    pub repetition_penalty: f32,
    /// Seed of the sampler's random generator.
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self { temperature: 0.0, top_p: 1.0, top_k: 0, repetition_penalty: 1.0, seed: 0 }
    }
}

/// A seeded sampler.
#[derive(Debug)]
pub struct Sampler {
    config: SamplingConfig,
    rng: StdRng,
}

impl Sampler {
    /// A sampler with its own random generator seeded from `config.seed`.
    pub fn new(config: SamplingConfig) -> Self {
        let rng = StdRng::seed_from_u64(config.seed);
        Self { config, rng }
    }

    /// Whether [`Self::sample`] is the first largest logit whatever it is given: temperature 0
    /// (or top-k 1) and no repetition penalty.
    pub fn is_greedy(&self) -> bool {
        let c = &self.config;
        (c.temperature <= 0.0 || c.top_k == 1) && c.repetition_penalty == 1.0
    }

    /// Picks the next token from `logits` `[vocab]`, given every token seen so far.
    pub fn sample(&mut self, logits: &mut [f32], seen: &[u32]) -> u32 {
        let c = &self.config;
        if c.repetition_penalty != 1.0 {
            apply_repetition_penalty(logits, seen, c.repetition_penalty);
        }
        if c.temperature <= 0.0 {
            return argmax(logits) as u32;
        }
        for l in logits.iter_mut() {
            *l /= c.temperature;
        }
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if c.top_k > 0 && c.top_k < order.len() {
            order.truncate(c.top_k);
        }
        let max = logits[order[0]];
        let mut probs: Vec<f32> = order.iter().map(|&i| (logits[i] - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if c.top_p < 1.0 {
            // Keep the smallest prefix whose mass reaches top_p (at least one token).
            let mut mass = 0.0;
            let mut keep = probs.len();
            for (n, p) in probs.iter().enumerate() {
                mass += p;
                if mass >= c.top_p {
                    keep = n + 1;
                    break;
                }
            }
            probs.truncate(keep);
            order.truncate(keep);
            let total: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= total);
        }
        let r: f32 = self.rng.random();
        let mut acc = 0.0;
        for (p, &i) in probs.iter().zip(&order) {
            acc += p;
            if r < acc {
                return i as u32;
            }
        }
        order[order.len() - 1] as u32
    }
}

/// Index of the largest logit; the first one on ties, as `torch.argmax`.
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best
}

/// transformers' `RepetitionPenaltyLogitsProcessor`: each distinct seen token's logit is
/// divided by `penalty` when positive and multiplied by it when negative.
pub fn apply_repetition_penalty(logits: &mut [f32], seen: &[u32], penalty: f32) {
    let mut done = vec![false; logits.len()];
    for &t in seen {
        let t = t as usize;
        if t < logits.len() && !done[t] {
            done[t] = true;
            let l = &mut logits[t];
            *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingConfig::default());
        assert_eq!(s.sample(&mut [0.1, 3.0, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative() {
        let mut l = [2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut l, &[0, 1, 1], 2.0);
        assert_eq!(l, [1.0, -4.0, 1.0]);
    }

    #[test]
    fn top_k_one_is_greedy_whatever_the_temperature() {
        let cfg = SamplingConfig { temperature: 5.0, top_k: 1, seed: 7, ..Default::default() };
        let mut s = Sampler::new(cfg);
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [0.0, 0.5, 0.4], &[]), 1);
        }
    }

    #[test]
    fn top_p_excludes_the_tail() {
        // Probabilities ~[0.665, 0.245, 0.090]: top_p 0.7 keeps the first two only.
        let cfg = SamplingConfig { temperature: 1.0, top_p: 0.7, seed: 3, ..Default::default() };
        let mut s = Sampler::new(cfg);
        let mut counts = [0; 3];
        for _ in 0..2000 {
            counts[s.sample(&mut [2.0, 1.0, 0.0], &[]) as usize] += 1;
        }
        assert_eq!(counts[2], 0);
        assert!(counts[0] > counts[1] && counts[1] > 300, "{counts:?}");
    }

    #[test]
    fn the_seed_makes_sampling_reproducible() {
        let cfg = SamplingConfig { temperature: 1.0, seed: 42, ..Default::default() };
        let draw = |cfg: SamplingConfig| {
            let mut s = Sampler::new(cfg);
            (0..50).map(|_| s.sample(&mut [0.3, 0.2, 0.1, 0.0], &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(cfg.clone()), draw(cfg));
    }
}
