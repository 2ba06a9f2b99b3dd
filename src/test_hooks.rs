//! Test hooks: failure injection that the integration tests drive through the environment of
//! the real binary. Compiled only with the `test-hooks` cargo feature, which `cargo test`
//! turns on (a dev-dependency of baton on itself) and a default or release build leaves off:
//! there every hook is a constant `false` and the variables are never read.
//!
//! - `BATON_TEST_FAULT=slow_ready`: a successor delays its `Ready` by 2 s.
//! - `BATON_TEST_FAULT=kill_after_first_batch`: a successor SIGKILLs itself on receiving its
//!   first connection batch, before acknowledging it.
//! - `BATON_TEST_FAULT=hold_upgrade:STEP`: a predecessor stops for good before STEP of its
//!   handover (`listeners`, `batch`, `commit` or `done`), so a test can SIGKILL it there.
//! - `BATON_TEST_FAULT=grow_memory:INDEX`: worker INDEX allocates and touches 8 MiB every
//!   20 ms once it serves, without end.
//! - `BATON_TEST_FAULT=rotate_ticket_keys:PATH`: a supervisor rotates its session-ticket keys
//!   (and sends them to its workers) at the first tick that finds PATH, which it removes.
//! - `BATON_HOSTS_FILE` (read in [`crate::upstream::resolve`]): names resolve from that file only.

/// Whether this binary was built with the test hooks.
pub const ENABLED: bool = cfg!(feature = "test-hooks");

/// Whether `BATON_TEST_FAULT` asks for fault `name`.
#[cfg(feature = "test-hooks")]
pub fn fault(name: &str) -> bool {
    std::env::var("BATON_TEST_FAULT").is_ok_and(|v| v == name)
}

/// Without the `test-hooks` feature no fault is ever asked for.
#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn fault(_name: &str) -> bool {
    false
}

/// With `BATON_TEST_FAULT=hold_upgrade:STEP`, never returns (after a log line naming the step):
/// the predecessor's handover stops before `step`, for a test to kill it there.
#[cfg(feature = "test-hooks")]
pub async fn hold_upgrade(step: &str) {
    if fault(&format!("hold_upgrade:{step}")) {
        tracing::warn!(step, "test fault: upgrade held");
        std::future::pending::<()>().await;
    }
}

/// Without the `test-hooks` feature, nothing.
#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub async fn hold_upgrade(_step: &str) {}

/// With `BATON_TEST_FAULT=grow_memory:INDEX`, worker INDEX starts a thread that allocates and
/// touches 8 MiB every 20 ms, without end (for the memory-limit test).
#[cfg(feature = "test-hooks")]
pub fn grow_memory(index: usize) {
    if !fault(&format!("grow_memory:{index}")) {
        return;
    }
    tracing::warn!("test fault: growing memory without bound");
    std::thread::spawn(|| {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            hoard.push(vec![1u8; 8 << 20]);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    });
}

/// Without the `test-hooks` feature, nothing.
#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn grow_memory(_index: usize) {}

/// With `BATON_TEST_FAULT=rotate_ticket_keys:PATH`: whether PATH exists (it is removed, so
/// each file asks for one rotation).
#[cfg(feature = "test-hooks")]
pub fn rotate_ticket_keys() -> bool {
    std::env::var("BATON_TEST_FAULT")
        .ok()
        .and_then(|v| v.strip_prefix("rotate_ticket_keys:").map(str::to_string))
        .is_some_and(|path| std::fs::remove_file(path).is_ok())
}

/// Without the `test-hooks` feature, never.
#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn rotate_ticket_keys() -> bool {
    false
}

/// Says at start that the hooks are compiled in, so such a build is never mistaken for a
/// production one.
pub fn announce() {
    if ENABLED {
        tracing::warn!("built with test hooks (cargo feature test-hooks): not for production");
    }
}
