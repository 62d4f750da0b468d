//! `cowsnap io`: a `qemu-io` for the engine.

#[derive(clap::Args)]
pub struct IoArgs {}

pub fn run(_args: IoArgs) -> anyhow::Result<u8> {
    anyhow::bail!("not built yet")
}
