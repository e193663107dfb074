//! `cbgate man` (hidden): the man pages, made from the same clap definition as `--help`, so they
//! cannot drift from the flags. Packaging runs it (packaging/build-deb.sh); a build script could
//! not, as it cannot see the binary's `Cli`.

use std::io::Write as _;
use std::path::Path;

use anyhow::Context as _;
use clap::CommandFactory as _;

use super::Cli;

/// Prints `cbgate(1)` as roff, or with `dir` writes it and one page per subcommand
/// (`cbgate-serve(1)`, ..., which `cbgate(1)` refers to) into that directory.
pub fn run(dir: Option<&Path>) -> anyhow::Result<()> {
    let cmd = Cli::command().disable_help_subcommand(true);
    match dir {
        Some(dir) => clap_mangen::generate_to(cmd, dir)
            .with_context(|| format!("cannot write the man pages into {}", dir.display())),
        None => {
            // Into a buffer first, then one write: a closed pipe is an error, not a panic.
            let mut page = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut page)?;
            std::io::stdout()
                .write_all(&page)
                .context("cannot write the man page to stdout")
        }
    }
}
