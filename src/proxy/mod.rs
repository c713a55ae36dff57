//! The agent-blind egress proxy: the child holds placeholders, never values; this module
//! intercepts its HTTPS traffic and swaps each placeholder for the value bound to the host
//! the request goes to (and back again in what the upstream echoes).

pub mod hosts;
pub mod substitute;
