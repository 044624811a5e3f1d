//! `drctl`: see the library for the commands.

use clap::Parser;

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = tern_cli::args::Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(tern_cli::run(cli)) {
        eprintln!("error: {e}");
        std::process::exit(e.exit_code());
    }
}
