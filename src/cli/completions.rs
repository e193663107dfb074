//! `cbgate completions SHELL`: a shell completion script on stdout.

use std::io::Write as _;

use clap::CommandFactory as _;

use super::Cli;

/// Prints the completion script for `shell`.
pub fn run(shell: clap_complete::Shell) {
    // Into a buffer first: clap_complete panics when its writer fails (a closed pipe).
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "cbgate", &mut script);
    let _ = std::io::stdout().write_all(&script);
}
