use std::process::ExitCode;

use clap::Parser;
use s3grant::cli::{self, Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let output = match cli.command {
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
