//! The `stevedore` command: parses the command line (`cli`) and runs the library.

mod cli;

fn main() {
    cli::main()
}
