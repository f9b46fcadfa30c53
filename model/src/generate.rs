//! The decoding loop: prefill the prompt once, then one token at a time with a KV cache.

use std::time::{Duration, Instant};

use burn::tensor::{Int, Tensor, TensorData};

use crate::llama::{CausalLm, KvCache};
use crate::sampling::Sampler;

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

/// Generates up to `max_tokens` tokens after `prompt`, stopping at any id in `eos`.
///
/// `on_token` receives each generated token as soon as it is chosen; the EOS token that
/// ends generation is not passed on. `prompt` must not be empty.
pub fn generate(model: &CausalLm, prompt: &[u32], max_tokens: usize, eos: &[u32], sampler: &mut Sampler, mut on_token: impl FnMut(u32)) -> GenerationStats {
    assert!(!prompt.is_empty(), "generate needs at least one prompt token");
    let device = model.device();
    let mut cache = KvCache::default();
    let mut seen: Vec<u32> = prompt.to_vec();
    let mut stats = GenerationStats { prompt_tokens: prompt.len(), ..Default::default() };
    let start = Instant::now();
    let mut input: Vec<u32> = prompt.to_vec();
    let mut gen_start = start;
    while stats.generated_tokens < max_tokens {
        let ids: Vec<i64> = input.iter().map(|&t| t as i64).collect();
        let n = ids.len();
        let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), &device);
        let logits = model.forward_cached(tokens, &mut cache); // [1, vocab]
        let mut logits: Vec<f32> = logits.into_data().convert::<f32>().try_to_vec().expect("f32 logits");
        if cache.len() == prompt.len() {
            stats.prompt_time = start.elapsed();
            gen_start = Instant::now();
        }
        if logits.iter().any(|x| !x.is_finite()) {
            stats.non_finite = true;
            break;
        }
        let next = sampler.sample(&mut logits, &seen);
        if eos.contains(&next) {
            stats.hit_eos = true;
            break;
        }
        stats.generated_tokens += 1;
        on_token(next);
        seen.push(next);
        input = vec![next];
    }
    stats.generation_time = gen_start.elapsed();
    stats
}
