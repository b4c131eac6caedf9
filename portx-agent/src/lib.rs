//! portx agent (being assembled).
pub mod btf;
pub mod cli;
pub mod clock;
pub mod decoder;
pub mod loader;
pub mod netns;
pub mod privilege;
pub mod procfs;
pub mod reader;
pub mod sockdiag;
pub mod sysctl;
pub mod tracefs;
pub mod tracker;
pub mod workload;
