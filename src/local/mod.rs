//! `r4 run`: a whole workflow on one machine, no cluster — simulated agents and tools from the
//! manifest's `simulate:` blocks, the real engine, the embedded queue (or Redis), live progress
//! and a final report. It reuses the engine; it does not reimplement it.

pub mod report;
pub mod run;
pub mod sim;
pub mod simagent;
pub mod simtool;
