//! `cowsnap cow ...`: offline tools for COW devices.

use clap::Subcommand;

#[derive(Subcommand)]
pub enum CowCommand {}

pub fn run(cmd: CowCommand) -> anyhow::Result<u8> {
    match cmd {}
}
