//! The decoding loop: prefill the prompt once, then one token at a time with a KV cache.

use std::time::{Duration, Instant};

use burn::tensor::{Int, Tensor, TensorData};

use crate::llama::{CausalLm, KvCache};
use crate::sampling::{Sampler, SamplingConfig};

/// Timings of one generation.
#[derive(Debug, Clone, Default)]
pub struct GenerationStats {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Time to process the prompt and produce the first logits.
    pub prompt_time: Duration,
    /// Tokens generated (EOS excluded).
    pub generated_tokens: usize,
    /// Time spent generating after the prompt.
    pub generation_time: Duration,
    /// Whether generation stopped at an end-of-sequence token.
    pub hit_eos: bool,
    /// Whether generation stopped because the logits were not finite (NaN weights, or an
    /// overflow of the compute dtype); nothing is sampled from such logits.
    pub non_finite: bool,
}

/// One sequence being decoded: its cache, sampler and the tokens the next step feeds.
///
/// The cache is allocated once for the prompt and `max_tokens`. Greedy decoding picks the
/// token on the device and reads back only its id (and whether the logits were finite);
/// sampling reads the logits. The server steps several of these in turn; [`generate`] runs
/// one to the end.
#[derive(Debug)]
pub struct Decoding {
    cache: KvCache,
    sampler: Sampler,
    seen: Vec<u32>,
    input: Vec<u32>,
}

impl Decoding {
    /// A sequence that starts with `prompt` (not empty) and will produce at most `max_tokens`.
    pub fn new(prompt: &[u32], max_tokens: usize, sampler: Sampler) -> Self {
        assert!(!prompt.is_empty(), "decoding needs at least one prompt token");
        Self { cache: KvCache::with_capacity(prompt.len() + max_tokens), sampler, seen: prompt.to_vec(), input: prompt.to_vec() }
    }

    /// Runs the pending tokens (the prompt, then the last chosen token) through `model` and
    /// chooses the next token, which the following step feeds; `None` when the logits are
    /// not finite.
    pub fn step(&mut self, model: &CausalLm) -> Option<u32> {
        let ids: Vec<i64> = self.input.iter().map(|&t| t as i64).collect();
        let n = ids.len();
        let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), &model.device());
        let logits = model.forward_cached(tokens, &mut self.cache); // [1, vocab]
        let next = if self.sampler.is_greedy() {
            greedy_on_device(logits)
        } else {
            let mut logits: Vec<f32> = logits.into_data().convert::<f32>().try_to_vec().expect("f32 logits");
            logits.iter().all(|x| x.is_finite()).then(|| self.sampler.sample(&mut logits, &self.seen))
        }?;
        self.seen.push(next);
        self.input = vec![next];
        Some(next)
    }

    /// Positions in the cache: the prompt and every token fed since.
    pub fn position(&self) -> usize {
        self.cache.len()
    }
}

/// Generates up to `max_tokens` tokens after `prompt`, stopping at any id in `eos`.
///
/// `on_token` receives each generated token as soon as it is chosen; the EOS token that
/// ends generation is not passed on. `prompt` must not be empty.
pub fn generate(model: &CausalLm, prompt: &[u32], max_tokens: usize, eos: &[u32], sampler: &mut Sampler, mut on_token: impl FnMut(u32)) -> GenerationStats {
    // The sampler moves into the sequence and back, its random state advanced.
    let mut decoding = Decoding::new(prompt, max_tokens, std::mem::replace(sampler, Sampler::new(SamplingConfig::default())));
    let mut stats = GenerationStats { prompt_tokens: prompt.len(), ..Default::default() };
    let start = Instant::now();
    let mut gen_start = start;
    while stats.generated_tokens < max_tokens {
        let picked = decoding.step(model);
        if decoding.position() == prompt.len() {
            stats.prompt_time = start.elapsed();
            gen_start = Instant::now();
        }
        let Some(next) = picked else {
            stats.non_finite = true;
            break;
        };
        if eos.contains(&next) {
            stats.hit_eos = true;
            break;
        }
        stats.generated_tokens += 1;
        on_token(next);
    }
    stats.generation_time = gen_start.elapsed();
    *sampler = decoding.sampler;
    stats
}

/// The first largest logit of `logits` `[1, vocab]`, or `None` when any logit is not finite,
/// computed on the device: one read of two numbers instead of the vocabulary.
fn greedy_on_device(logits: Tensor<2>) -> Option<u32> {
    let both: Vec<f32> = lora_kernels::decode::greedy_pick(logits).into_data().convert::<f32>().try_to_vec().expect("f32 values");
    (both[1] == 0.0).then_some(both[0] as u32)
}
