use std::process::ExitCode;

use clap::Parser;
use s3grant::cli::{self, Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let output = match cli.command {
        Command::Run(config) => return run(config),
        Command::Crd(args) => cli::crd(&args),
        Command::Policy(args) => cli::policy(&args),
        Command::Plan(args) => cli::plan(&args),
    };
    match output {
        Ok(text) => {
            print!("{text}");
            if !text.is_empty() && !text.ends_with('\n') {
                println!();
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: s3grant::cli::RunConfig) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(s3grant::operator::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
