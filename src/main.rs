fn main() -> std::process::ExitCode {
    bitback::cli::main()
}
