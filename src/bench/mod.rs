//! `r4 bench`: each benchmark runs r4 against its peer in the same run and returns JSON.

pub mod breaker;
pub mod controller;
pub mod devcluster;
pub mod hedge;
pub mod killswitch;
pub mod killswitch_api;
pub mod pipeline;
