//! Median, percentiles and spread of repeated measurements.

use std::time::Duration;

/// Linear-interpolated percentile (`p` in 0..=100); 0 for no samples.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = p / 100.0 * (s.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    s[lo] + (s[hi] - s[lo]) * (rank - lo as f64)
}

pub fn median(v: &[f64]) -> f64 {
    percentile(v, 50.0)
}

/// (min, max) of the samples.
pub fn spread(v: &[f64]) -> (f64, f64) {
    v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)))
}

/// Milliseconds of a duration.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Median of durations.
pub fn median_duration(v: &[Duration]) -> Duration {
    Duration::from_secs_f64(median(&v.iter().map(Duration::as_secs_f64).collect::<Vec<_>>()))
}

/// Percentile of durations.
pub fn percentile_duration(v: &[Duration], p: f64) -> Duration {
    Duration::from_secs_f64(percentile(&v.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(), p))
}

/// Median and spread of a set of samples.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Summary {
    /// `None` without samples; non-finite samples are dropped.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        let finite: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if finite.is_empty() {
            return None;
        }
        let (min, max) = spread(&finite);
        Some(Summary { median: median(&finite), min, max, n: finite.len() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate() {
        let v = [4.0, 1.0, 3.0, 2.0];
        assert_eq!(median(&v), 2.5);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 100.0), 4.0);
        assert!((percentile(&v, 99.0) - 3.97).abs() < 1e-9);
        assert_eq!(median(&[]), 0.0);
        assert_eq!(spread(&v), (1.0, 4.0));
    }

    #[test]
    fn summary_has_median_and_spread_of_finite_samples() {
        let s = Summary::of(&[3.0, f64::NAN, 1.0, 2.0, f64::INFINITY]).unwrap();
        assert_eq!(s, Summary { median: 2.0, min: 1.0, max: 3.0, n: 3 });
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(Summary::of(&[f64::NAN]), None);
    }

    #[test]
    fn durations() {
        let v = [Duration::from_millis(10), Duration::from_millis(30), Duration::from_millis(20)];
        assert_eq!(median_duration(&v), Duration::from_millis(20));
        assert_eq!(ms(Duration::from_micros(1500)), 1.5);
        assert!(percentile_duration(&v, 100.0) >= Duration::from_millis(29));
    }
}
