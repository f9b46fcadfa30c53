//! Preference tuning on pairs of completions of one prompt, chosen and rejected: DPO (its
//! sigmoid and IPO losses) against the base with the adapters switched off, and ORPO, as TRL's
//! `DPOTrainer` and `ORPOTrainer` compute them.
//!
//! A batch holds `n` pairs as `2n` rows, the chosen completions first, then the rejected ones
//! in the same order ([`lora_data::pair_rows`]); each row's targets are its completion. Each
//! step runs the policy forward once with a graph; the log-probabilities of every position are
//! read from its last hidden state, and (DPO) from a forward pass of the base without a graph.
//! The loss is a function of per-sequence sums of those, so its gradient reaches each position
//! as a weight on that position's NLL: one backward pass of `Σ weight·nll` gives the exact
//! gradient.

use burn::tensor::{DType, Tensor, TensorData};
use lora_data::Batch;
use lora_model::CausalLm;
use serde::{Deserialize, Serialize};

use crate::loss::{Prepared, position_nll, prepare, weighted_gradients};

/// What a run optimizes.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub enum Objective {
    /// The token-averaged NLL of the targets (supervised fine-tuning).
    #[default]
    Sft,
    /// Direct preference optimization with the temperature `beta`.
    Dpo {
        /// β: how far from the reference the policy may move.
        beta: f64,
        /// The loss on the reward margin.
        loss: DpoLoss,
    },
    /// Odds-ratio preference optimization: the chosen completion's NLL plus `beta` times the
    /// log-odds-ratio term; no reference model.
    Orpo {
        /// λ (TRL's `beta`): the weight of the odds-ratio term.
        beta: f64,
    },
}

impl Objective {
    /// Whether the rows come in pairs of chosen and rejected completions.
    pub fn is_preference(&self) -> bool {
        !matches!(self, Objective::Sft)
    }
}

/// DPO's loss on `h = β·((log πc − log refc) − (log πr − log refr))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DpoLoss {
    /// `−log σ(h)`: the original DPO loss.
    Sigmoid,
    /// IPO: `(h/β − 1/(2β))²` with the log-ratios averaged over each completion's tokens.
    Ipo,
}

/// What a batch of pairs scores: the loss and the metrics TRL logs, averaged over its pairs.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// The batch's loss.
    pub loss: f64,
    /// TRL's names and values: `rewards/chosen`, `rewards/rejected`, `rewards/accuracies`,
    /// `rewards/margins`, `logps/chosen`, `logps/rejected`; for ORPO also `nll_loss`,
    /// `log_odds_ratio` and `log_odds_chosen`.
    pub metrics: Vec<(&'static str, f64)>,
    /// The completion tokens of the batch.
    pub tokens: usize,
    /// The derivative of the loss in each position's NLL, `[rows, width]` row-major.
    weights: Vec<f32>,
}

/// Per row of a batch: the summed log-probability of its completion, its completion's token
/// count, and (for ORPO's NLL) the summed NLL of every real target and their count.
struct Row {
    logp: f64,
    n: usize,
    nll_all: f64,
    n_all: usize,
}

/// Reads the rows' sums from the per-position NLL `nll` `[rows, width]`.
fn rows(batch: &Batch, width: usize, nll: &[f32]) -> Vec<Row> {
    (0..batch.rows)
        .map(|r| {
            let mut row = Row { logp: 0.0, n: 0, nll_all: 0.0, n_all: 0 };
            for p in 0..width.min(batch.lengths[r].saturating_sub(1)) {
                let v = nll[r * width + p] as f64;
                row.nll_all += v;
                row.n_all += 1;
                if batch.is_target(r, p + 1) {
                    row.logp -= v;
                    row.n += 1;
                }
            }
            row
        })
        .collect()
}

/// `log σ(x)`, stable for large `|x|`.
fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 { -(-x).exp().ln_1p() } else { x - x.exp().ln_1p() }
}

/// `σ(x)`.
fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// The loss, metrics and position weights of `objective` for a batch of pairs whose
/// per-position NLL `[rows, width]` is `policy` under the model and `reference` under the
/// reference (DPO).
fn score(objective: Objective, batch: &Batch, width: usize, policy: &[f32], reference: Option<&[f32]>) -> Scored {
    let pairs = batch.rows / 2;
    let pi = rows(batch, width, policy);
    let re = reference.map(|r| rows(batch, width, r));
    let mut weights = vec![0f32; batch.rows * width];
    // Adds `w` to the weight of every completion position of row `r` (or every real one).
    let mut weigh = |r: usize, w: f64, all: bool| {
        for p in 0..width.min(batch.lengths[r].saturating_sub(1)) {
            if all || batch.is_target(r, p + 1) {
                weights[r * width + p] += w as f32;
            }
        }
    };
    let k = pairs.max(1) as f64;
    let mut loss = 0.0;
    let (mut chosen, mut rejected, mut accuracies, mut margins) = (0.0, 0.0, 0.0, 0.0);
    let (mut logps_chosen, mut logps_rejected) = (0.0, 0.0);
    let mut extra: Vec<(&'static str, f64)> = Vec::new();
    match objective {
        Objective::Sft => unreachable!("the preference loss of an SFT run"),
        Objective::Dpo { beta, loss: kind } => {
            let re = re.expect("DPO has a reference");
            for i in 0..pairs {
                let (c, r) = (i, pairs + i);
                let (dc, dr) = (pi[c].logp - re[c].logp, pi[r].logp - re[r].logp);
                let (nc, nr) = (pi[c].n.max(1) as f64, pi[r].n.max(1) as f64);
                // d loss / d (log π of the chosen, rejected sequence), for this pair.
                let (gc, gr) = match kind {
                    DpoLoss::Sigmoid => {
                        let h = beta * (dc - dr);
                        loss -= log_sigmoid(h) / k;
                        let g = -beta * sigmoid(-h) / k;
                        (g, -g)
                    }
                    DpoLoss::Ipo => {
                        let h = dc / nc - dr / nr - 1.0 / (2.0 * beta);
                        loss += h * h / k;
                        (2.0 * h / (nc * k), -2.0 * h / (nr * k))
                    }
                };
                // The NLL is minus the log-probability.
                weigh(c, -gc, false);
                weigh(r, -gr, false);
                chosen += beta * dc / k;
                rejected += beta * dr / k;
                accuracies += f64::from(u8::from(beta * dc > beta * dr)) / k;
                logps_chosen += pi[c].logp / k;
                logps_rejected += pi[r].logp / k;
            }
        }
        Objective::Orpo { beta } => {
            let n_all: usize = (0..pairs).map(|i| pi[i].n_all).sum();
            let nll = (0..pairs).map(|i| pi[i].nll_all).sum::<f64>() / n_all.max(1) as f64;
            let (mut ratio, mut odds) = (0.0, 0.0);
            for i in 0..pairs {
                let (c, r) = (i, pairs + i);
                weigh(c, 1.0 / n_all.max(1) as f64, true);
                let (nc, nr) = (pi[c].n.max(1) as f64, pi[r].n.max(1) as f64);
                // Average log-probabilities, kept below 0 so that log(1 − e^a) and the
                // gradient stay finite where every token is certain (or a completion empty).
                let (ac, ar) = ((pi[c].logp / nc).min(-1e-12), (pi[r].logp / nr).min(-1e-12));
                // log(1 − e^a) for a < 0.
                let log1m = |a: f64| (-a.exp_m1()).ln();
                let log_odds = (ac - ar) - (log1m(ac) - log1m(ar));
                ratio += log_sigmoid(log_odds) / k;
                odds += log_odds / k;
                // d(−β·log σ(o))/do, and do/dac = 1/(1 − e^ac), do/dar = −1/(1 − e^ar).
                let g = -beta * sigmoid(-log_odds) / k;
                let (gc, gr) = (g / -ac.exp_m1() / nc, -g / -ar.exp_m1() / nr);
                weigh(c, -gc, false);
                weigh(r, -gr, false);
                chosen += beta * ac / k;
                rejected += beta * ar / k;
                accuracies += f64::from(u8::from(ac > ar)) / k;
                logps_chosen += ac / k;
                logps_rejected += ar / k;
            }
            loss = nll - beta * ratio;
            extra = vec![("nll_loss", nll), ("log_odds_ratio", ratio), ("log_odds_chosen", odds)];
        }
    }
    margins += chosen - rejected;
    let mut metrics = vec![
        ("rewards/chosen", chosen),
        ("rewards/rejected", rejected),
        ("rewards/accuracies", accuracies),
        ("rewards/margins", margins),
        ("logps/chosen", logps_chosen),
        ("logps/rejected", logps_rejected),
    ];
    metrics.extend(extra);
    Scored { loss, metrics, tokens: pi.iter().map(|r| r.n).sum(), weights }
}

/// The per-position NLL `[rows, width]` of the base with the adapters switched off (PEFT's
/// `disable_adapter`), on the host.
fn reference_nll(model: &CausalLm, p: &Prepared) -> Vec<f32> {
    let base = model.without_adapters();
    let hidden = p.hidden(&base);
    host(position_nll(&base, hidden, p.targets.clone()))
}

fn host(t: Tensor<2>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 values")
}

/// One batch of pairs: the loss and metrics of `objective`, and the gradient of every trainable
/// tensor of the loss times `scale` (flattened, in [`crate::params::for_each_trainable`]
/// order; see [`crate::loss::loss_and_gradients`] for `recompute`).
pub fn loss_and_gradients(model: &mut CausalLm, batch: &Batch, objective: Objective, recompute: bool, scale: f64) -> (Scored, Vec<Tensor<1>>) {
    let p = prepare(batch, &model.device());
    let width = p.inputs.dims()[1];
    let reference = matches!(objective, Objective::Dpo { .. }).then(|| reference_nll(model, &p));
    let mut scored = None;
    let (_, flat) = weighted_gradients(model, &p, recompute, scale, |model, hidden| {
        let policy = host(position_nll(model, hidden, p.targets.clone()));
        let mut s = score(objective, batch, width, &policy, reference.as_deref());
        let weights = Tensor::from_data(TensorData::new(std::mem::take(&mut s.weights), [batch.rows, width]), (&model.device(), DType::F32));
        scored = Some(s);
        (weights, 1.0)
    });
    (scored.expect("weighed"), flat)
}

/// The loss and metrics of `objective` for a batch of pairs, without gradients.
pub fn batch_scores(model: &CausalLm, batch: &Batch, objective: Objective) -> Scored {
    let p = prepare(batch, &model.device());
    let width = p.inputs.dims()[1];
    let reference = matches!(objective, Objective::Dpo { .. }).then(|| reference_nll(model, &p));
    let policy = host(position_nll(model, p.hidden(model), p.targets.clone()));
    score(objective, batch, width, &policy, reference.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ORPO where the policy is certain of every chosen token (an average log-probability of
    /// 0, where log(1 − e^a) is −∞): a finite loss and finite weights.
    #[test]
    fn orpo_stays_finite_when_a_completion_is_certain() {
        let b = batch();
        let mut policy = vec![0.7f32; 12];
        policy[1] = 0.0;
        policy[2] = 0.0;
        let s = score(Objective::Orpo { beta: 0.1 }, &b, 3, &policy, None);
        assert!(s.loss.is_finite() && s.weights.iter().all(|w| w.is_finite()), "{} {:?}", s.loss, s.weights);
        assert!(s.metrics.iter().all(|(_, v)| v.is_finite()), "{:?}", s.metrics);
    }

    /// Two pairs of rows of 4 tokens, completions from token 2; per-position NLL given.
    fn batch() -> Batch {
        Batch {
            tokens: vec![1; 16],
            rows: 4,
            len: 4,
            targets: vec![std::iter::once(2..4).collect(); 4],
            starts: vec![vec![]; 4],
            lengths: vec![4, 4, 3, 4],
            padding: 1,
        }
    }

    /// The weights are the loss's derivatives: a finite difference in one position's NLL
    /// moves the loss by its weight, for every objective.
    #[test]
    fn the_weights_are_the_derivatives_of_the_loss() {
        let b = batch();
        let width = 3;
        let policy: Vec<f32> = (0..12).map(|i| 0.3 + 0.17 * i as f32).collect();
        let reference: Vec<f32> = (0..12).map(|i| 0.5 + 0.11 * ((i * 7) % 5) as f32).collect();
        let objectives =
            [Objective::Dpo { beta: 0.1, loss: DpoLoss::Sigmoid }, Objective::Dpo { beta: 0.5, loss: DpoLoss::Ipo }, Objective::Orpo { beta: 0.1 }];
        for objective in objectives {
            let s = score(objective, &b, width, &policy, Some(&reference));
            for pos in 0..12 {
                let eps = 1e-3f32;
                let mut up = policy.clone();
                up[pos] += eps;
                let mut down = policy.clone();
                down[pos] -= eps;
                let slope =
                    (score(objective, &b, width, &up, Some(&reference)).loss - score(objective, &b, width, &down, Some(&reference)).loss) / (2.0 * eps as f64);
                assert!((slope - s.weights[pos] as f64).abs() < 1e-4, "{objective:?} position {pos}: slope {slope}, weight {}", s.weights[pos]);
            }
        }
    }

    /// DPO's metrics as TRL defines them, on numbers worked by hand.
    #[test]
    fn dpo_metrics_are_trls() {
        let b = batch();
        // Completion positions: rows 0, 1, 3 at positions 1, 2; row 2 (length 3) at 1 only.
        let mut policy = vec![0f32; 12];
        let mut reference = vec![0f32; 12];
        policy[1] = 1.0; // row 0: log π = −1
        reference[1] = 2.0; // row 0: log ref = −2
        policy[3 * 2 + 1] = 3.0; // row 2 (pair 0 rejected): log π = −3, log ref = 0
        let s = score(Objective::Dpo { beta: 0.1, loss: DpoLoss::Sigmoid }, &b, 3, &policy, Some(&reference));
        let m: std::collections::HashMap<_, _> = s.metrics.iter().copied().collect();
        // Pair 0: rewards 0.1 and −0.3; pair 1: 0 and 0.
        assert!((m["rewards/chosen"] - 0.05).abs() < 1e-12 && (m["rewards/rejected"] + 0.15).abs() < 1e-12);
        assert!((m["rewards/accuracies"] - 0.5).abs() < 1e-12 && (m["rewards/margins"] - 0.2).abs() < 1e-12);
        assert!((m["logps/chosen"] + 0.5).abs() < 1e-12 && (m["logps/rejected"] + 1.5).abs() < 1e-12);
        let want = (-log_sigmoid(0.4) - log_sigmoid(0.0)) / 2.0;
        assert!((s.loss - want).abs() < 1e-12, "{} {want}", s.loss);
    }
}
