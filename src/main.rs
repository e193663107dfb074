//! The `cbgate` binary: parse flags, harden the process, dispatch to a subcommand in `cli/`.

mod cli;

use std::process::ExitCode;

use clap::Parser as _;

use cbgate::ops::harden;
use cli::{Cli, Command, Failure, EXIT_CONFIG};

fn main() -> ExitCode {
    // Before any secret is read: no core files, not dumpable, memory locked where allowed.
    let hardening = harden::apply();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let args: Vec<String> = std::env::args_os()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            eprint!("{}", cli::redact_args(&e.render().to_string(), &args));
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(EXIT_CONFIG));
        }
    };
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
        Some(Command::Halt(args)) => cli::halt::halt(args, env),
        Some(Command::Resume(args)) => cli::halt::resume(args, env),
        Some(Command::Status(args)) => cli::halt::status(args, env),
        Some(Command::Audit(cli::AuditCommand::Verify { files })) => cli::audit::verify(files),
        Some(Command::PlaceholderKey(args)) => cli::placeholder::run(args),
        Some(Command::Ca(args)) => cli::ca::run(args, env),
        Some(Command::Completions { shell }) => {
            cli::completions::run(shell);
            Ok(())
        }
        Some(Command::Man { dir }) => cli::man::run(dir.as_deref()).map_err(Failure::Runtime),
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
        // Already logged by `serve`; the log writer has flushed by now.
        Err(Failure::Signal(code)) => ExitCode::from(code),
    }
}
