//! The handover: the private channel to a successor, its framed messages, and fd passing.
