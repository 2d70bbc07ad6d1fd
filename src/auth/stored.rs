//! The text forms of key and account records in the stores that keep them as text (SQLite,
//! PostgreSQL, Redis): one encoding, read back the same way by every backend.

use std::{collections::BTreeMap, sync::Arc};

#[cfg(any(feature = "redis", feature = "postgres"))]
use super::KeyAdminError;
use super::{AccountStatus, KeyStatus};

/// A key's status as stored.
pub(crate) fn key_status(status: KeyStatus) -> &'static str {
    match status {
        KeyStatus::Active => "active",
        KeyStatus::Disabled => "disabled",
        KeyStatus::Revoked => "revoked",
    }
}

/// A stored key status; anything but `active` or `disabled` reads as revoked (fail closed).
pub(crate) fn parse_key_status(text: Option<&str>) -> KeyStatus {
    match text {
        Some("active") => KeyStatus::Active,
        Some("disabled") => KeyStatus::Disabled,
        _ => KeyStatus::Revoked,
    }
}

/// An account's status as stored: the word, and the reason of a block.
pub(crate) fn account_status(status: &AccountStatus) -> (&'static str, Option<&str>) {
    match status {
        AccountStatus::Active => ("active", None),
        AccountStatus::Frozen => ("frozen", None),
        AccountStatus::Blocked(reason) => ("blocked", Some(reason)),
    }
}

/// A stored account status (`reason`: the stored reason of a block); anything but `active` or
/// `frozen` reads as blocked (fail closed).
pub(crate) fn parse_account_status(text: &str, reason: impl FnOnce() -> Arc<str>) -> AccountStatus {
    match text {
        "active" => AccountStatus::Active,
        "frozen" => AccountStatus::Frozen,
        _ => AccountStatus::Blocked(reason()),
    }
}

/// A list of strings as a JSON array.
pub(crate) fn json_list(list: &[String]) -> String {
    serde_json::Value::from(list.to_vec()).to_string()
}

/// A map of strings as a JSON object.
pub(crate) fn json_map(map: &BTreeMap<String, String>) -> String {
    let object: serde_json::Map<String, serde_json::Value> = map
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str())))
        .collect();
    serde_json::Value::Object(object).to_string()
}

/// A JSON array of strings; `None` when it is anything else.
pub(crate) fn parse_list(text: &[u8]) -> Option<Vec<String>> {
    match serde_json::from_slice(text).ok()? {
        serde_json::Value::Array(items) => items
            .into_iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => None,
    }
}

/// A JSON object of strings; `None` when it is anything else.
pub(crate) fn parse_map(text: &str) -> Option<BTreeMap<String, String>> {
    match serde_json::from_str(text).ok()? {
        serde_json::Value::Object(map) => map
            .into_iter()
            .map(|(k, v)| Some((k, v.as_str()?.to_owned())))
            .collect(),
        _ => None,
    }
}

/// Put the ids into the errors a store could only name by kind.
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) fn named(error: KeyAdminError, key: &Arc<str>, account: &Arc<str>) -> KeyAdminError {
    match error {
        KeyAdminError::DuplicateKey(_) => KeyAdminError::DuplicateKey(key.clone()),
        KeyAdminError::UnknownKey(_) => KeyAdminError::UnknownKey(key.clone()),
        KeyAdminError::Revoked(_) => KeyAdminError::Revoked(key.clone()),
        KeyAdminError::UnknownAccount(_) => KeyAdminError::UnknownAccount(account.clone()),
        other => other,
    }
}
