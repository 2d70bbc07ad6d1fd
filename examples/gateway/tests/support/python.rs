//! A Python interpreter with the OpenAI SDK, provisioned by the tests themselves.
//!
//! `python3` is used as it is when it already imports `openai`; otherwise a virtualenv is made
//! once under `target/sdk-venv` and the SDK installed into it (`python3 -m venv`, then
//! `pip install openai`), so `cargo test --all-features` passes on a fresh machine.

use std::{
    path::PathBuf,
    process::Command,
    sync::{Mutex, OnceLock},
};

/// The interpreter to run the SDK scripts with.
pub fn python_with_openai() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    static PROVISION: Mutex<()> = Mutex::new(());
    PYTHON
        .get_or_init(|| {
            let _one_at_a_time = PROVISION.lock().unwrap_or_else(|e| e.into_inner());
            let imports = |python: &std::path::Path| {
                Command::new(python)
                    .args(["-c", "import openai"])
                    .output()
                    .is_ok_and(|o| o.status.success())
            };
            let system = PathBuf::from("python3");
            if imports(&system) {
                return system;
            }
            // The workspace's target/ (this package is examples/gateway/ in it).
            let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/sdk-venv");
            let python = venv.join("bin/python");
            if imports(&python) {
                return python;
            }
            let made = Command::new("python3")
                .args(["-m", "venv"])
                .arg(&venv)
                .status()
                .expect("python3 runs");
            assert!(made.success(), "python3 -m venv {} failed", venv.display());
            let installed = Command::new(&python)
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "openai",
                ])
                .status()
                .expect("the venv's python runs");
            assert!(
                installed.success(),
                "pip install openai into {} failed",
                venv.display()
            );
            assert!(imports(&python), "openai does not import after its install");
            python
        })
        .clone()
}
