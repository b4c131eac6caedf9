//! The hidden `man` and `completions` subcommands: the man page (roff, with clap_mangen) and
//! shell completions (clap_complete), both generated from the same clap definition as `--help`,
//! so they cannot drift from it. For packagers:
//! `portx-agent man > portx-agent.1`, `portx-agent completions bash > portx-agent.bash`.
use std::io::{self, Write};

use clap::CommandFactory as _;

use crate::cli::Cli;

/// Writes the man page of `portx-agent` and its subcommands.
pub fn write_man(out: &mut dyn Write) -> io::Result<()> {
    let cmd = Cli::command();
    clap_mangen::Man::new(cmd.clone()).render(out)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        // clap wants a 'static name; a handful of subcommands, leaked once per call.
        let name: &'static str =
            Box::leak(format!("portx-agent-{}", sub.get_name()).into_boxed_str());
        let page = sub.clone().name(name);
        writeln!(out)?;
        clap_mangen::Man::new(page).render(out)?;
    }
    Ok(())
}

/// Writes completions for `shell`. Generated into memory first: clap_complete panics on a
/// write error, and a closed pipe is an error to report, not a crash.
pub fn write_completions(shell: clap_complete::Shell, out: &mut dyn Write) -> io::Result<()> {
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "portx-agent", &mut buf);
    out.write_all(&buf)?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn man_page_has_every_visible_subcommand_and_the_examples() {
        let mut buf = Vec::new();
        write_man(&mut buf).unwrap();
        let text = String::from_utf8(buf).unwrap();
        assert!(text.contains(".TH portx-agent"), "{}", &text[..200]);
        assert!(text.contains("portx\\-agent\\-trace") || text.contains("portx-agent-trace"));
        assert!(text.contains("EXAMPLES"));
        assert!(!text.contains("workload"), "hidden subcommands stay hidden");
    }

    #[test]
    fn completions_know_the_subcommands_and_flags() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut buf = Vec::new();
            write_completions(shell, &mut buf).unwrap();
            let text = String::from_utf8(buf).unwrap();
            assert!(text.contains("trace"), "{shell}");
            assert!(text.contains("max-sockets"), "{shell}");
        }
    }
}
