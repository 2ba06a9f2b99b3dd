//! What time it is, cheaply. The HTTP/1.1 engine read the clock about 12 times per keep-alive
//! request (deadlines, idle ages, the balancer's ejection checks, the access line), each a TSC
//! read through the vDSO plus `SystemTime`'s conversions. Times that only feed deadlines counted
//! in seconds come from the kernel's coarse clocks (updated every tick, 1–4 ms, no TSC read);
//! the two that make a request's duration (its start and its end) stay precise.

// Through nix (libc's `clock_gettime`, the vDSO by glibc), not rustix: rustix's own vDSO
// lookup crashes under valgrind (rustix issue #1559), and callgrind is how
// scripts/bench/instructions.sh counts instructions.
use nix::time::{clock_gettime, ClockId};

/// Milliseconds of `clock` (0 if it cannot be read, which Linux never does for these).
fn ms(clock: ClockId) -> u64 {
    clock_gettime(clock).map_or(0, |t| {
        (t.tv_sec() as u64)
            .saturating_mul(1000)
            .saturating_add(t.tv_nsec() as u64 / 1_000_000)
    })
}

/// Now, in milliseconds since the Unix epoch: for what is shown or measured (a request's start
/// and end, connection start times).
pub fn now_ms() -> u64 {
    ms(ClockId::CLOCK_REALTIME)
}

/// Milliseconds since the Unix epoch from the coarse clock: at most a tick (≤ 4 ms) behind
/// [`now_ms`]. For deadlines and the times they are counted from.
pub fn coarse_ms() -> u64 {
    ms(ClockId::CLOCK_REALTIME_COARSE)
}

/// Milliseconds of the coarse monotonic clock (since boot): ages and ejection windows that
/// must not move with the wall clock.
pub fn coarse_mono_ms() -> u64 {
    ms(ClockId::CLOCK_MONOTONIC_COARSE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coarse_clocks_follow_the_precise_ones() {
        let before = now_ms();
        let coarse = coarse_ms();
        let after = now_ms();
        // The coarse clock is at most a tick behind and never ahead.
        assert!(coarse <= after, "coarse {coarse} ahead of {after}");
        assert!(
            coarse + 1000 >= before,
            "coarse {coarse} far behind {before}"
        );
        let m0 = coarse_mono_ms();
        let m1 = coarse_mono_ms();
        assert!(m1 >= m0);
    }
}
