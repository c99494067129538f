//! Sampling parameters, validated before they reach the engine.

/// How a token is chosen from the logits. `temperature == 0` is greedy.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1.0 disables top-p.
    pub top_p: f32,
    /// 0.0 disables min-p.
    pub min_p: f32,
    /// 1.0 disables the penalty.
    pub repetition_penalty: f32,
    /// OpenAI's penalties (-2 to 2, 0 disables): every token already
    /// generated loses `presence_penalty` once plus `frequency_penalty` per
    /// time it was generated, from its logit.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Added to the logits of these tokens (-100 to 100) before sampling.
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: Option<u64>,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// The reply is one JSON object: every token must continue one, and the
    /// reply ends when it closes.
    pub json_object: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: None,
            max_tokens: 256,
            stop: Vec::new(),
            json_object: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    #[error("`temperature` must be between 0 and 2, got {0}")]
    Temperature(f32),
    #[error("`top_p` must be > 0 and <= 1, got {0}")]
    TopP(f32),
    #[error("`min_p` must be >= 0 and < 1, got {0}")]
    MinP(f32),
    #[error("`repetition_penalty` must be > 0 and <= 10, got {0}")]
    RepetitionPenalty(f32),
    #[error("`presence_penalty` must be between -2 and 2, got {0}")]
    PresencePenalty(f32),
    #[error("`frequency_penalty` must be between -2 and 2, got {0}")]
    FrequencyPenalty(f32),
    #[error("`logit_bias` values must be between -100 and 100, got {0}")]
    LogitBias(f32),
    #[error("`max_tokens` must be at least 1, got {0}")]
    MaxTokens(usize),
    #[error("`stop` may hold at most 16 strings of 1 to 256 bytes")]
    Stop,
}

impl SamplingParams {
    pub const MAX_STOP: usize = 16;

    /// Checks every field; the error names the first field out of range.
    pub fn validate(&self) -> Result<(), SamplingError> {
        let t = self.temperature;
        if !(0.0..=2.0).contains(&t) || t.is_nan() {
            return Err(SamplingError::Temperature(t));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::TopP(self.top_p));
        }
        if !(self.min_p >= 0.0 && self.min_p < 1.0) {
            return Err(SamplingError::MinP(self.min_p));
        }
        let rp = self.repetition_penalty;
        if !(rp > 0.0 && rp <= 10.0) {
            return Err(SamplingError::RepetitionPenalty(rp));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return Err(SamplingError::PresencePenalty(self.presence_penalty));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err(SamplingError::FrequencyPenalty(self.frequency_penalty));
        }
        if let Some(&(_, b)) = self.logit_bias.iter().find(|(_, b)| !(-100.0..=100.0).contains(b)) {
            return Err(SamplingError::LogitBias(b));
        }
        if self.max_tokens == 0 {
            return Err(SamplingError::MaxTokens(0));
        }
        if self.stop.len() > Self::MAX_STOP || self.stop.iter().any(|s| s.is_empty() || s.len() > 256) {
            return Err(SamplingError::Stop);
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// Why a sequence stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-sequence or end-of-turn token.
    Stop,
    /// A stop string matched.
    StopString,
    /// `max_tokens` reached.
    Length,
    /// The context window is full.
    ContextFull,
    Cancelled,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field() {
        let ok = SamplingParams::default();
        assert!(ok.validate().is_ok());
        let bad = |f: fn(&mut SamplingParams)| {
            let mut p = SamplingParams::default();
            f(&mut p);
            p.validate().unwrap_err().to_string()
        };
        assert!(bad(|p| p.temperature = -1.0).contains("`temperature`"));
        assert!(bad(|p| p.temperature = f32::NAN).contains("`temperature`"));
        assert!(bad(|p| p.top_p = 0.0).contains("`top_p`"));
        assert!(bad(|p| p.min_p = 1.0).contains("`min_p`"));
        assert!(bad(|p| p.repetition_penalty = 0.0).contains("`repetition_penalty`"));
        assert!(bad(|p| p.max_tokens = 0).contains("`max_tokens`"));
        assert!(bad(|p| p.stop = vec![String::new()]).contains("`stop`"));
    }
}
