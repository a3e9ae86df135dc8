//! Token sampling: greedy or temperature sampling with a seed. The full sampler set (top-k/p,
//! min-p, penalties, logit bias) builds on this.

use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::error::{Error, Result};

/// Picks the next token from a row of logits.
#[derive(Debug, Clone)]
pub struct Sampler {
    temperature: f64,
    rng: StdRng,
}

/// Temperatures above this are rejected as almost certainly a mistake.
pub const MAX_TEMPERATURE: f64 = 100.0;

impl Sampler {
    /// `temperature` 0 means greedy (argmax). Same seed and settings → same tokens.
    pub fn new(temperature: f64, seed: u64) -> Result<Self> {
        if !temperature.is_finite() || !(0.0..=MAX_TEMPERATURE).contains(&temperature) {
            return Err(Error::InvalidParameter {
                name: "temperature",
                reason: format!("{temperature} is not in [0, {MAX_TEMPERATURE}]"),
            });
        }
        Ok(Self {
            temperature,
            rng: StdRng::seed_from_u64(seed),
        })
    }

    /// Samples an id from `logits` (one per vocabulary entry). Non-finite logits never win.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if self.temperature == 0.0 {
            return argmax(logits);
        }
        let max = logits.iter().copied().filter(|x| x.is_finite()).fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f64> = logits
            .iter()
            .map(|&l| if l.is_finite() { ((f64::from(l - max)) / self.temperature).exp() } else { 0.0 })
            .collect();
        let total: f64 = weights.iter().sum();
        if !(total > 0.0 && total.is_finite()) {
            return argmax(logits);
        }
        let mut r = self.rng.random::<f64>() * total;
        for (i, w) in weights.iter().enumerate() {
            if r < *w {
                return Ok(i as u32);
            }
            r -= w;
        }
        argmax(logits)
    }
}

/// Index of the largest finite logit.
pub fn argmax(logits: &[f32]) -> Result<u32> {
    logits
        .iter()
        .enumerate()
        .filter(|(_, x)| !x.is_nan())
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i as u32)
        .ok_or_else(|| Error::InvalidParameter {
            name: "logits",
            reason: "no finite logits to sample from".into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_seeded_sampling() {
        let logits = [0.1, 3.0, -1.0, 2.9];
        assert_eq!(Sampler::new(0.0, 1).unwrap().sample(&logits).unwrap(), 1);
        let run = |seed| {
            let mut s = Sampler::new(1.0, seed).unwrap();
            (0..20).map(|_| s.sample(&logits).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert!(run(7).contains(&3), "temperature 1 should sometimes pick the runner-up");
        for bad in [-0.5, f64::NAN, 1e9] {
            assert!(matches!(Sampler::new(bad, 0), Err(Error::InvalidParameter { name: "temperature", .. })));
        }
        assert!(argmax(&[]).is_err());
    }
}
