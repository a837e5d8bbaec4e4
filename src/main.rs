//! The `pmcache` command. Everything lives in the library (`pmcache::cli`).

fn main() -> std::process::ExitCode {
    pmcache::cli::main()
}
