//! The gateway example (being assembled).
mod upstream;
fn main() {}
