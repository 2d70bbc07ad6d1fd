//! Configuration of a whole chain from TOML.
