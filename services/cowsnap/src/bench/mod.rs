//! `cowsnap bench ...`: benchmarks.

use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {}

pub fn run(cmd: BenchCommand) -> anyhow::Result<u8> {
    match cmd {}
}
