//! Authentication: API keys → a [`Caller`].

mod caller;

pub use caller::{Caller, CallerBuilder};
