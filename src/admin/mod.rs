//! The operator admin router.
