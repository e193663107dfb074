//! The `cbgate` binary: parse flags, harden the process, dispatch to a subcommand in `cli/`.

mod cli;

use std::process::ExitCode;

use clap::Parser as _;

use cbgate::ops::harden;
use cli::{Cli, Command, Failure, EXIT_CONFIG};

fn main() -> ExitCode {
    // Before any secret is read: no core files, not dumpable, memory locked where allowed.
    let hardening = harden::apply();
    let cli = Cli::parse();
    let env = match cli::environment() {
        Ok(env) => env,
        Err(e) => {
            eprintln!("cbgate: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let result = match cli.command {
        None => cli::serve::run(cli.serve, env, &hardening),
        Some(Command::Serve(args)) => cli::serve::run(args, env, &hardening),
        Some(Command::Token(args)) => cli::token::run(args, env),
        Some(Command::Check(args)) => cli::check::run(args, env, &hardening),
        Some(Command::Health(args)) => cli::health::run(args, env),
        Some(Command::Audit(cli::AuditCommand::Verify { files })) => cli::audit::verify(files),
        Some(Command::Completions { shell }) => {
            cli::completions::run(shell);
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(e)) => {
            eprintln!("cbgate: {e:#}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(Failure::Runtime(e)) => {
            eprintln!("cbgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}
