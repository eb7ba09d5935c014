//! `parley`: the node (`parley serve`) and the command-line client. See [`parley_node::cli`].

fn main() -> std::process::ExitCode {
    parley_node::cli::main()
}
