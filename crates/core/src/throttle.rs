//! A log line that fires for every request while a cause lasts (the
//! database down, say) is let through once a period, with the count of those
//! held back since: an outage then reads as a line a second per kind with its
//! volume, instead of thousands of copies burying the line that differs.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// One throttle per call site, usually a `static`.
#[derive(Debug)]
pub struct Throttle {
    period_ms: u64,
    /// When the next line may pass, in milliseconds since [`start`].
    next_ms: AtomicU64,
    /// Lines held back since the last one let through.
    held: AtomicU64,
}

impl Throttle {
    /// At most one line a second.
    pub const fn per_second() -> Throttle {
        Throttle::every_ms(1000)
    }

    pub const fn every_ms(period_ms: u64) -> Throttle {
        Throttle {
            period_ms,
            next_ms: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// `Some(n)` if this line may be logged now, `n` being how many were
    /// held back since the last one; `None` if it is to be held back.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(start().elapsed().as_millis() as u64)
    }

    fn admit_at(&self, now_ms: u64) -> Option<u64> {
        let next = self.next_ms.load(Ordering::Relaxed);
        // Of lines racing at the turn of a period, exactly one wins the swap.
        if now_ms >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now_ms.saturating_add(self.period_ms),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            Some(self.held.swap(0, Ordering::Relaxed))
        } else {
            self.held.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// The process's own time origin, so that a throttle needs no clock passed in.
fn start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn one_line_a_period_carries_the_count_held_back() {
        let t = Throttle::every_ms(1000);
        assert_eq!(t.admit_at(5), Some(0));
        for now in [5, 6, 500, 1004] {
            assert_eq!(t.admit_at(now), None, "at {now} ms");
        }
        assert_eq!(t.admit_at(1005), Some(4));
        assert_eq!(t.admit_at(1006), None);
        // After a quiet spell the next line passes at once.
        assert_eq!(t.admit_at(90_000), Some(1));
        assert_eq!(t.admit_at(90_001), None);
    }

    #[test]
    fn of_threads_racing_in_one_period_exactly_one_is_let_through() {
        let t = Throttle::every_ms(u64::MAX / 2);
        let admitted: Vec<Option<u64>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| (0..1000).map(|_| t.admit_at(7)).collect::<Vec<_>>()))
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        assert_eq!(admitted.iter().filter(|a| a.is_some()).count(), 1);
        assert_eq!(t.held.load(Ordering::Relaxed), 7999);
    }

    proptest! {
        /// Whatever the times (in order), no line is lost from the count:
        /// every call is either let through or counted in a later line's
        /// `n` (or still held), and passed lines are a period apart.
        #[test]
        fn every_line_is_logged_or_counted(steps in proptest::collection::vec(0u64..3000, 1..200)) {
            let t = Throttle::every_ms(1000);
            let mut now = 0;
            let (mut passed, mut counted) = (0u64, 0u64);
            let mut last: Option<u64> = None;
            for step in &steps {
                now += step;
                if let Some(n) = t.admit_at(now) {
                    passed += 1;
                    counted += n;
                    if let Some(l) = last {
                        prop_assert!(now >= l + 1000);
                    }
                    last = Some(now);
                }
            }
            let still_held = t.held.load(Ordering::Relaxed);
            prop_assert_eq!(passed + counted + still_held, steps.len() as u64);
        }
    }
}
