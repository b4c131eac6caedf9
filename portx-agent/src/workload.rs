//! (being written)
#[derive(Debug, clap::Subcommand)]
pub enum WorkloadCmd {
    /// Placeholder.
    Park,
}
pub fn run(_cmd: WorkloadCmd) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
