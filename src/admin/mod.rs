//! Operating a running baton: the control socket the CLI talks to, the status it reports, the
//! HTTP admin endpoint ([`http`]), the systemd integration ([`notify`]) and status rendering
//! ([`status`]).

pub mod control;
pub mod http;
pub mod notify;
pub mod status;

pub use status::{render_listeners, render_status};
