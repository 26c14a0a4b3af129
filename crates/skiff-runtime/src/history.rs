//! The last hour of each service, for the console's charts: every 10 s a
//! sample of the gateway's counts (`skiff_gateway::Meters`) and of the
//! service's instances, kept in memory (361 samples per service, a few
//! tens of kilobytes). The charts are per minute: requests, errors, the
//! latency's p50 and p99 (from the duration histogram's buckets, as
//! Prometheus's `histogram_quantile` estimates them) and instances.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use skiff_gateway::{Counts, DURATION_BUCKETS};

/// How often a sample is taken.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Samples kept per service: an hour's, and the one before it.
const KEPT: usize = 361;

/// One service at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub at: SystemTime,
    /// Answers so far (the gateway's own included), and those of 5xx.
    pub answers: u64,
    pub errors: u64,
    /// Answers so far per duration bucket (`DURATION_BUCKETS`, then one
    /// beyond).
    pub buckets: [u64; DURATION_BUCKETS.len() + 1],
    pub running: usize,
    pub suspended: usize,
    pub starting: usize,
}

impl Sample {
    pub fn new(at: SystemTime, counts: &Counts, instances: (usize, usize, usize)) -> Self {
        Self {
            at,
            answers: counts.count(),
            errors: counts.by_class[4],
            buckets: counts.buckets,
            running: instances.0,
            suspended: instances.1,
            starting: instances.2,
        }
    }
}

/// One minute of a chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Minute {
    /// When the minute ended.
    pub at: SystemTime,
    pub requests: u64,
    /// Answers with a 5xx status.
    pub errors: u64,
    /// Estimated from the histogram; `None` without requests.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Instances (all states) at the minute's end.
    pub instances: usize,
}

/// Every service's samples.
#[derive(Debug, Default)]
pub struct History {
    services: Mutex<HashMap<String, VecDeque<Sample>>>,
}

impl History {
    /// Adds this moment's samples; services not among them are forgotten.
    pub fn record(&self, samples: Vec<(String, Sample)>) {
        let mut services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        services.retain(|name, _| samples.iter().any(|(n, _)| n == name));
        for (name, sample) in samples {
            let kept = services.entry(name).or_default();
            if kept.len() == KEPT {
                kept.pop_front();
            }
            kept.push_back(sample);
        }
    }

    /// The last hour of `service`, per minute, oldest first (the minutes
    /// it was sampled in).
    pub fn minutes(&self, service: &str) -> Vec<Minute> {
        let services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        services
            .get(service)
            .map(|s| per_minute(&s.iter().cloned().collect::<Vec<_>>()))
            .unwrap_or_default()
    }

    /// Requests and 5xx answers of `service` in the last `window` (as far
    /// as samples reach), for the console's rates.
    pub fn recent(&self, service: &str, window: Duration) -> Option<(u64, u64, Duration)> {
        let services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        let kept = services.get(service)?;
        let last = kept.back()?;
        let since = last.at.checked_sub(window)?;
        let first = kept.iter().find(|s| s.at >= since)?;
        let span = last.at.duration_since(first.at).ok()?;
        (!span.is_zero()).then(|| {
            (
                last.answers.saturating_sub(first.answers),
                last.errors.saturating_sub(first.errors),
                span,
            )
        })
    }
}

/// Each minute's differences, the last sample closing the last minute:
/// from each end back to the latest sample a minute (less half a
/// sample's time) before it, whatever delays the samples had.
fn per_minute(samples: &[Sample]) -> Vec<Minute> {
    let minute = Duration::from_secs(60) - SAMPLE_EVERY / 2;
    let mut ends = Vec::new();
    let mut end = samples.len().checked_sub(1);
    while let Some(e) = end {
        ends.push(e);
        end = (0..e).rev().find(|&s| {
            samples[e]
                .at
                .duration_since(samples[s].at)
                .is_ok_and(|d| d >= minute)
        });
    }
    ends.reverse();
    ends.windows(2)
        .map(|w| {
            let (a, b) = (&samples[w[0]], &samples[w[1]]);
            let mut buckets = [0u64; DURATION_BUCKETS.len() + 1];
            for (d, (x, y)) in buckets.iter_mut().zip(a.buckets.iter().zip(&b.buckets)) {
                *d = y.saturating_sub(*x);
            }
            Minute {
                at: b.at,
                requests: b.answers.saturating_sub(a.answers),
                errors: b.errors.saturating_sub(a.errors),
                p50_ms: quantile(0.5, &buckets).map(|s| s * 1000.0),
                p99_ms: quantile(0.99, &buckets).map(|s| s * 1000.0),
                instances: b.running + b.suspended + b.starting,
            }
        })
        .collect()
}

/// The `q` quantile of a histogram's (non-cumulative) bucket counts, in
/// seconds: linear within the bucket it falls in, the last finite bound
/// for the unbounded bucket.
pub fn quantile(q: f64, buckets: &[u64; DURATION_BUCKETS.len() + 1]) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut seen = 0u64;
    for (i, n) in buckets.iter().enumerate() {
        if *n == 0 {
            continue;
        }
        if (seen + n) as f64 >= rank {
            let Some(upper) = DURATION_BUCKETS.get(i) else {
                return DURATION_BUCKETS.last().copied();
            };
            let lower = if i == 0 { 0.0 } else { DURATION_BUCKETS[i - 1] };
            let within = (rank - seen as f64) / *n as f64;
            return Some(lower + (upper - lower) * within.clamp(0.0, 1.0));
        }
        seen += n;
    }
    DURATION_BUCKETS.last().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(secs: u64, answers: u64, errors: u64, fast: u64, instances: usize) -> Sample {
        let mut buckets = [0u64; DURATION_BUCKETS.len() + 1];
        // `fast` in the first bucket (≤ 0.5 ms), the rest in ≤ 10 ms.
        buckets[0] = fast;
        buckets[4] = answers - fast;
        Sample {
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
            answers,
            errors,
            buckets,
            running: instances,
            suspended: 0,
            starting: 0,
        }
    }

    #[test]
    fn quantiles_interpolate_within_their_bucket() {
        let mut b = [0u64; DURATION_BUCKETS.len() + 1];
        assert_eq!(quantile(0.5, &b), None);
        b[0] = 100;
        // Half of the first bucket's 0.5 ms.
        assert!((quantile(0.5, &b).unwrap() - 0.00025).abs() < 1e-12);
        b[14] = 100;
        // Beyond the last bound: the last bound.
        assert_eq!(quantile(0.99, &b), Some(60.0));
    }

    #[test]
    fn minutes_are_the_differences_of_samples_a_minute_apart() {
        let history = History::default();
        // 13 samples, 10 s apart: two whole minutes.
        for i in 0..13u64 {
            let answers = i * 100;
            let fast = if i <= 6 { answers } else { 600 };
            history.record(vec![(
                "api".into(),
                sample(i * 10, answers, i, fast, 1 + (i as usize) / 7),
            )]);
        }
        let minutes = history.minutes("api");
        assert_eq!(minutes.len(), 2);
        assert_eq!((minutes[0].requests, minutes[0].errors), (600, 6));
        assert_eq!((minutes[1].requests, minutes[1].errors), (600, 6));
        // All fast in the first minute, all up to 10 ms in the second.
        assert!(minutes[0].p99_ms.unwrap() <= 0.5);
        assert!(minutes[1].p50_ms.unwrap() > 5.0 && minutes[1].p50_ms.unwrap() <= 10.0);
        assert_eq!((minutes[0].instances, minutes[1].instances), (1, 2));
        let (requests, errors, span) = history.recent("api", Duration::from_secs(60)).unwrap();
        assert_eq!((requests, errors, span), (600, 6, Duration::from_secs(60)));
        // A removed service's samples go.
        history.record(vec![]);
        assert!(history.minutes("api").is_empty());
    }

    #[test]
    fn a_late_sample_does_not_stretch_the_minutes() {
        let history = History::default();
        // Samples at 0, 10, ..., 50 s, then late ones at 65 and 75 s.
        for secs in [0, 10, 20, 30, 40, 50, 65, 75] {
            history.record(vec![("api".into(), sample(secs, secs * 10, 0, 0, 1))]);
        }
        let minutes = history.minutes("api");
        // From 75 s back to the latest sample 55 s or more before: 20 s
        // (by index, six samples back, it would be 0 s: 75 s long).
        assert_eq!(minutes.len(), 1);
        assert_eq!(minutes[0].requests, 550);
    }

    #[test]
    fn an_hour_is_kept() {
        let history = History::default();
        for i in 0..1000u64 {
            history.record(vec![("api".into(), sample(i * 10, i, 0, i, 1))]);
        }
        assert_eq!(history.minutes("api").len(), 60);
    }
}
