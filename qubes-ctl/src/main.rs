use clap::Parser;

fn main() {
    let cli = qubes_ctl::cli::Cli::parse();
    if let Err(e) = qubes_ctl::cli::main_with(cli) {
        eprintln!("qubes-ctl: error: {}", qubes_ctl::cli::error_text(&e));
        std::process::exit(1);
    }
}
