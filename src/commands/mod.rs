//! One module per subcommand. Each `run` returns the exit code, or an error
//! that `cli::main` prints as one line.

pub mod check;
pub mod dump;
pub mod flush;
pub mod format;
pub mod serve;
pub mod stats;
