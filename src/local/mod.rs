//! `r4 run`: a whole workflow on one machine, no cluster — simulated agents and tools from the
//! manifest's `simulate:` blocks, the real engine, the embedded queue (or Redis), live progress
//! and a final report, with `--drill` a ChaosDrill run against it. It reuses the engine (and the
//! drill runner the controller uses); it does not reimplement them. `r4 sim-agent`
//! ([`simagent_server`]) puts a simulated agent behind the real agent protocol, for a cluster.

pub mod drill;
pub mod fleet;
pub mod report;
pub mod run;
pub mod sim;
pub mod simagent;
pub mod simagent_server;
pub mod simtool;
