//! GCRA (the generic cell rate algorithm): a token bucket kept as one number, the theoretical
//! arrival time (TAT) of the next request. The Redis script computes the same in Lua.

use std::time::Duration;

use crate::config::ClassLimit;

/// The fixed parameters of a bucket, in nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    /// Time one token takes to come back (`per / rate`).
    pub interval_ns: u64,
    /// `burst x interval`: how far ahead of now the TAT may run.
    pub capacity_ns: u64,
}

impl Params {
    /// The parameters of `limit`, with the rate and burst divided by `share` (1 for the whole
    /// budget; `replicas` for a process's share of it).
    pub fn new(limit: &ClassLimit, share: f64) -> Params {
        let share = if share.is_finite() && share > 0.0 {
            share
        } else {
            1.0
        };
        let rate = limit.per_second() / share;
        let interval_ns = (1e9 / rate).clamp(1.0, 1e18) as u64;
        let burst = ((f64::from(limit.burst()) / share).floor() as u64).max(1);
        Params {
            interval_ns,
            capacity_ns: interval_ns.saturating_mul(burst),
        }
    }
}

/// One bucket's state.
#[derive(Clone, Debug)]
pub struct Gcra {
    pub params: Params,
    tat: u64,
}

impl Gcra {
    /// A full bucket.
    pub fn new(params: Params) -> Gcra {
        Gcra { params, tat: 0 }
    }

    /// Takes a token at `now` (ns on any monotonic clock): the tokens left, or how long until
    /// one is free (nothing is taken then).
    pub fn take(&mut self, now: u64) -> Result<u32, Duration> {
        let p = self.params;
        let next = self.tat.max(now).saturating_add(p.interval_ns);
        let ahead = next - now;
        if ahead > p.capacity_ns {
            return Err(Duration::from_nanos(ahead - p.capacity_ns));
        }
        self.tat = next;
        Ok(((p.capacity_ns - ahead) / p.interval_ns) as u32)
    }

    /// Takes a token that may lie in the future: when it is free within `max_wait`, it is
    /// reserved and the wait returned; otherwise nothing is taken and the wait needed returned.
    pub fn reserve(&mut self, now: u64, max_wait: Duration) -> Result<Duration, Duration> {
        let p = self.params;
        let next = self.tat.max(now).saturating_add(p.interval_ns);
        let wait = Duration::from_nanos((next - now).saturating_sub(p.capacity_ns));
        if wait > max_wait {
            return Err(wait);
        }
        self.tat = next;
        Ok(wait)
    }

    /// Tokens free at `now`, without taking one.
    pub fn tokens(&self, now: u64) -> u32 {
        let p = self.params;
        let ahead = self.tat.saturating_sub(now);
        (p.capacity_ns.saturating_sub(ahead) / p.interval_ns) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(rate: f64, burst: u32) -> ClassLimit {
        ClassLimit {
            rate,
            per: Duration::from_secs(1),
            burst: Some(burst),
        }
    }

    #[test]
    fn a_full_bucket_lets_burst_through_then_the_rate() {
        let mut g = Gcra::new(Params::new(&limit(10.0, 3), 1.0));
        let t0 = 1_000_000_000;
        assert_eq!(g.take(t0), Ok(2));
        assert_eq!(g.take(t0), Ok(1));
        assert_eq!(g.take(t0), Ok(0));
        let wait = g.take(t0).expect_err("empty");
        assert_eq!(wait, Duration::from_millis(100));
        // After the wait, exactly one more.
        assert_eq!(g.take(t0 + 100_000_000), Ok(0));
        assert!(g.take(t0 + 100_000_000).is_err());
        // A quiet second refills to the burst, not beyond.
        assert_eq!(g.tokens(t0 + 2_000_000_000), 3);
    }

    #[test]
    fn in_any_span_at_most_burst_plus_rate_times_span() {
        let mut g = Gcra::new(Params::new(&limit(30.0, 5), 1.0));
        let mut taken = 0u64;
        // Try every millisecond for 2 s.
        for ms in 0..2000u64 {
            while g.take(ms * 1_000_000).is_ok() {
                taken += 1;
            }
        }
        assert!(taken <= 5 + 60, "{taken}");
        assert!(taken >= 60, "{taken}");
    }

    #[test]
    fn a_share_divides_rate_and_burst() {
        let p = Params::new(&limit(30.0, 30), 3.0);
        assert_eq!(p.interval_ns, 100_000_000);
        assert_eq!(p.capacity_ns, 1_000_000_000);
        // Never below one token of burst.
        let p = Params::new(&limit(2.0, 2), 4.0);
        assert_eq!(p.capacity_ns, p.interval_ns);
    }
}
