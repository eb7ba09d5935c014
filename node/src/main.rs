//! `parley`: the node (`parley serve`) and the command-line client. See [`parley_node::cli`].

/// mimalloc instead of the system allocator: a node allocates and frees small buffers
/// on many threads at once (requests, automerge changes, sled pages), and glibc's
/// malloc spent about a sixth of a node's CPU on it under load (BENCHMARKS §3).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    parley_node::cli::main()
}
