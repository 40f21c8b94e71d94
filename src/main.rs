//! The binary: parse and validate settings, then run the service, or the operator command given
//! instead (`cli`).

mod cli;

use std::process::ExitCode;

use dynamodb_stream_consumer::config::Args;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for invalid settings (the convention of `EX_USAGE`-style usage errors).
const EXIT_BAD_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let mut args = Args::from_process();
    let config = match args.validate() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("{err}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    if let Some(command) = args.command.take() {
        return cli::run(command, &config);
    }
    dynamodb_stream_consumer::telemetry::init(config.log_format, config.debug);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dynamodb_stream_consumer::run(config)) {
        Ok(code) => code,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
