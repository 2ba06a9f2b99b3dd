//! baton: a TCP and HTTP reverse proxy that replaces its own binary while it runs, handing
//! every listener and live connection to its successor.
//!
//! Module map (dependencies point one way: lifecycle → handover → registry ← proxy → upstream):
//! - [`config`]: the YAML model, defaults, validation with line/column errors.
//! - [`listener`]: binding listening sockets (socket2) or adopting inherited ones.
//! - [`registry`]: the live connections and their state, the one thing proxy and handover share.
//! - [`proxy`]: the data path: [`proxy::tcp`] (L4 relay that can stop and say what it holds)
//!   and [`proxy::http`] (L7: baton's own HTTP/1.1 engine, h2c on hyper).
//! - [`upstream`]: server sets, balancing, active and passive health.
//! - [`handover`]: the private channel to a successor, its framed messages and fd passing.
//! - [`lifecycle`]: signals, the phase state machine, spawning the successor, rollback.
//! - [`supervisor`]: multi-process mode: owns listeners, runs, watches and upgrades N workers.
//! - [`spread`]: multi-process `shared` accept: new connections go to the least loaded worker.
//! - [`admin`]: the control socket for the CLI.
//! - [`clock`]: cheap clock reads (coarse clocks for deadlines).
//! - [`metrics`]: process counters that carry over across an upgrade.
//! - [`logging`]: tracing setup with `pid` and `generation` on every line, the access log.
//! - [`test_hooks`]: failure injection for the integration tests (cargo feature `test-hooks`).
//! - [`isolation`]: privilege drop, capabilities, worker namespaces, CPU pinning.
//! - [`tls`]: TLS termination and TLS to upstreams (rustls), and sessions that move to the
//!   successor.

pub mod admin;
pub mod clock;
pub mod config;
pub mod handover;
pub mod isolation;
pub mod lifecycle;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod registry;
pub mod spread;
pub mod supervisor;
pub mod test_hooks;
pub mod tls;
pub mod upstream;
