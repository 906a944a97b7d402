//! Limits that keep one tenant from starving the others: a token bucket for request rates,
//! and counted permits for things in flight (requests, uploads) per tenant, each answering
//! 429 with `Retry-After` when it is used up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{JobsConfig, LimitsConfig};
use crate::error::ServiceError;

/// `rate` tokens a second, at most `burst` saved up; each call takes one.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        TokenBucket { rate: f64::from(rate.max(1)), burst, tokens: burst, at: now }
    }

    /// Whether the bucket has refilled to its burst by `now` (it then holds no history).
    pub fn is_full(&self, now: Instant) -> bool {
        self.tokens + now.saturating_duration_since(self.at).as_secs_f64() * self.rate >= self.burst
    }

    /// Takes a token, or says how long until one is there.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

/// A closing connection's client that has sent nothing for this long is done with it.
const LINGER_GRACE: Duration = Duration::from_secs(1);

/// How fast a client must send: no silence longer than `idle`, at least `min_rate` bytes a
/// second on average once `grace` has passed, done by `deadline`. One rule for an upload's body
/// and for what a client still sends while its connection closes ([`crate::server`]).
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    pub idle: Duration,
    pub grace: Duration,
    pub min_rate: u64,
    pub deadline: Duration,
}

impl Pace {
    /// An upload's: `jobs.upload_idle_secs`, `limits.upload_*`.
    pub fn upload(jobs: &JobsConfig, limits: &LimitsConfig) -> Self {
        Pace {
            idle: Duration::from_secs(jobs.upload_idle_secs.max(1)),
            grace: Duration::from_secs(limits.upload_grace_secs),
            min_rate: limits.upload_min_bytes_per_sec,
            deadline: Duration::from_secs(limits.upload_deadline_secs.max(1)),
        }
    }

    /// What a client may still send while its connection closes (see `server::Linger`): as an
    /// upload must, after a grace of a second and with no silence longer than that, for at most
    /// `limits.linger_secs`.
    pub fn linger(limits: &LimitsConfig) -> Self {
        Pace {
            idle: LINGER_GRACE,
            grace: LINGER_GRACE,
            min_rate: limits.upload_min_bytes_per_sec,
            deadline: Duration::from_secs(limits.linger_secs),
        }
    }

    /// When the client has fallen behind if nothing more arrives, having sent `bytes` since
    /// `start` (the last of them at `last`), and what to say then.
    pub fn due(
        &self,
        start: tokio::time::Instant,
        last: tokio::time::Instant,
        bytes: u64,
    ) -> (tokio::time::Instant, String) {
        let mut due = (last + self.idle, format!("the upload sent nothing for {} s", self.idle.as_secs()));
        let deadline = start + self.deadline;
        if deadline < due.0 {
            due = (deadline, format!("the upload took longer than {} s", self.deadline.as_secs()));
        }
        if self.min_rate > 0 {
            // `bytes` meet the minimum rate until this long after the start.
            let kept_up = Duration::from_secs_f64(bytes as f64 / self.min_rate as f64).max(self.grace);
            if start + kept_up < due.0 {
                due = (
                    start + kept_up,
                    format!("the upload went slower than {} bytes a second", self.min_rate),
                );
            }
        }
        due
    }
}

/// Counts of things in flight per key (a tenant), each capped; a [`Permit`] gives its place
/// back when dropped.
#[derive(Debug, Default, Clone)]
pub struct InFlight {
    counts: Arc<Mutex<HashMap<String, u32>>>,
}

/// One place taken in an [`InFlight`] count.
#[derive(Debug)]
pub struct Permit {
    counts: Arc<Mutex<HashMap<String, u32>>>,
    key: String,
}

impl InFlight {
    /// Takes a place for `key` if fewer than `cap` are taken.
    pub fn try_take(&self, key: &str, cap: u32) -> Option<Permit> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(key.to_owned()).or_insert(0);
        if *n >= cap {
            if *n == 0 {
                counts.remove(key);
            }
            return None;
        }
        *n += 1;
        Some(Permit { counts: self.counts.clone(), key: key.to_owned() })
    }

    /// Places taken for `key`.
    pub fn taken(&self, key: &str) -> u32 {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).get(key).copied().unwrap_or(0)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// What the service counts per tenant while it is in flight.
#[derive(Debug, Default, Clone)]
pub struct TenantLimits {
    /// Requests being answered.
    pub requests: InFlight,
    /// Uploads being received.
    pub uploads: InFlight,
    /// Bytes of uploads being received (not yet stored), which count against disk quotas.
    pub upload_bytes: Reserved,
}

/// Bytes reserved per key while something is under way; a [`Reservation`] gives them back
/// when dropped.
#[derive(Debug, Default, Clone)]
pub struct Reserved {
    bytes: Arc<Mutex<HashMap<String, u64>>>,
}

/// Bytes held in a [`Reserved`] count, grown as an upload arrives.
#[derive(Debug)]
pub struct Reservation {
    bytes: Arc<Mutex<HashMap<String, u64>>>,
    key: String,
    held: u64,
}

impl Reserved {
    /// An empty reservation for `key`.
    pub fn start(&self, key: &str) -> Reservation {
        Reservation { bytes: self.bytes.clone(), key: key.to_owned(), held: 0 }
    }

    /// Bytes reserved for `key`.
    pub fn total(&self, key: &str) -> u64 {
        self.bytes.lock().unwrap_or_else(|p| p.into_inner()).get(key).copied().unwrap_or(0)
    }
}

impl Reservation {
    /// Reserves `n` more bytes if `key`'s total (all reservations) stays within `room`;
    /// otherwise reserves nothing and returns false.
    pub fn grow_within(&mut self, n: u64, room: u64) -> bool {
        let mut bytes = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        let total = bytes.entry(self.key.clone()).or_insert(0);
        if total.saturating_add(n) > room {
            return false;
        }
        *total += n;
        self.held += n;
        true
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut bytes = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(total) = bytes.get_mut(&self.key) {
            *total = total.saturating_sub(self.held);
            if *total == 0 {
                bytes.remove(&self.key);
            }
        }
    }
}

/// 429 for a limit of `what` (e.g. "uploads in flight") at `cap`.
pub fn too_many(what: &str, cap: u32, retry_after: Duration) -> ServiceError {
    ServiceError::TooManyRequests {
        detail: format!("too many {what} at once (at most {cap} per tenant); retry after the others finish"),
        retry_after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_gives_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(2, 3, t0);
        assert!((0..3).all(|_| b.take(t0).is_ok()));
        let wait = b.take(t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        assert!(b.take(t0 + Duration::from_millis(500)).is_ok());
        assert!(b.take(t0 + Duration::from_millis(500)).is_err());
        // Saved up to the burst, not beyond.
        let later = t0 + Duration::from_secs(60);
        assert!(b.is_full(later) && !b.is_full(t0 + Duration::from_millis(500)));
        assert!((0..3).all(|_| b.take(later).is_ok()));
        assert!(b.take(later).is_err());
    }

    #[test]
    fn reservations_stay_within_their_room_and_are_given_back() {
        let r = Reserved::default();
        let mut a = r.start("t");
        let mut b = r.start("t");
        assert!(a.grow_within(60, 100));
        assert!(!b.grow_within(50, 100), "60 + 50 > 100");
        assert!(b.grow_within(40, 100));
        assert_eq!(r.total("t"), 100);
        drop(a);
        assert_eq!(r.total("t"), 40);
        drop(b);
        assert_eq!(r.total("t"), 0);
        assert!(r.bytes.lock().unwrap().is_empty());
    }

    #[test]
    fn in_flight_permits_are_capped_per_key_and_given_back_on_drop() {
        let f = InFlight::default();
        let a1 = f.try_take("a", 2).unwrap();
        let _a2 = f.try_take("a", 2).unwrap();
        assert!(f.try_take("a", 2).is_none());
        let _b = f.try_take("b", 2).unwrap();
        assert_eq!((f.taken("a"), f.taken("b")), (2, 1));
        drop(a1);
        assert!(f.try_take("a", 2).is_some());
        assert!(f.try_take("c", 0).is_none());
        assert_eq!(f.counts.lock().unwrap().len(), 2, "an empty count leaves the map");
    }
}
