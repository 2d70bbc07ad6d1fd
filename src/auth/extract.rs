//! Finding the key in a request, and refusing the ways it can be wrong.

use std::borrow::Cow;

use http::{header, HeaderMap, HeaderName, Request, Uri};

use crate::{Reason, Rejection};

/// The `x-api-key` header.
pub(crate) const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// Longer than any key tollgate generates by far; longer values are not hashed.
const MAX_KEY_LEN: usize = 1024;

pub(crate) struct Sources<'a> {
    pub(crate) x_api_key: bool,
    pub(crate) query_param: Option<&'a str>,
}

fn malformed(message: &'static str) -> Rejection {
    Rejection::new(Reason::MalformedApiKey).with_message(message)
}

/// The key the request presents. Refusal messages never include any of the header's text.
pub(crate) fn extract<'r, B>(
    request: &'r Request<B>,
    sources: &Sources<'_>,
) -> Result<Cow<'r, str>, Rejection> {
    let headers = request.headers();
    let mut key: Option<Cow<'r, str>> = bearer(headers)?.map(Cow::Borrowed);
    if sources.x_api_key {
        if let Some(found) = single(headers, &X_API_KEY)? {
            let found = check(found)?;
            merge(&mut key, Cow::Borrowed(found))?;
        }
    }
    if let Some(name) = sources.query_param {
        if let Some(found) = query_key(request.uri(), name)? {
            let found = match found {
                Cow::Borrowed(s) => Cow::Borrowed(check(s)?),
                Cow::Owned(s) => Cow::Owned(check(&s)?.to_owned()),
            };
            merge(&mut key, found)?;
        }
    }
    key.ok_or_else(|| {
        let mut message = String::from(Reason::MissingApiKey.default_message());
        if sources.x_api_key {
            message.push_str(" The `x-api-key: YOUR_KEY` header works too.");
        }
        Rejection::new(Reason::MissingApiKey).with_message(message)
    })
}

/// Two sources must agree: never "first one wins".
fn merge<'r>(key: &mut Option<Cow<'r, str>>, found: Cow<'r, str>) -> Result<(), Rejection> {
    match key {
        Some(existing) if *existing != found => Err(malformed(
            "The request carries several different API keys. Send exactly one, in `Authorization: Bearer YOUR_KEY`.",
        )),
        Some(_) => Ok(()),
        None => {
            *key = Some(found);
            Ok(())
        }
    }
}

fn single<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Result<Option<&'h str>, Rejection> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(if name == header::AUTHORIZATION {
            malformed("The request has several Authorization headers. Send exactly one: `Authorization: Bearer YOUR_KEY`.")
        } else {
            malformed("The request has several x-api-key headers. Send exactly one.")
        });
    }
    value
        .to_str()
        .map(Some)
        .map_err(|_| malformed("The API key contains characters that are not allowed. Use exactly one header of the form `Authorization: Bearer YOUR_KEY`."))
}

fn bearer(headers: &HeaderMap) -> Result<Option<&str>, Rejection> {
    let Some(value) = single(headers, &header::AUTHORIZATION)? else {
        return Ok(None);
    };
    let wrong_scheme = || {
        malformed("The Authorization header must use the Bearer scheme: `Authorization: Bearer YOUR_KEY`.")
    };
    // An empty header or one with only whitespace after the scheme is malformed, not keyless.
    let (scheme, key) = value.split_once(' ').ok_or_else(wrong_scheme)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(wrong_scheme());
    }
    check(key).map(Some)
}

/// Whitespace and shape checks on a key's text.
fn check(key: &str) -> Result<&str, Rejection> {
    let trimmed = key.trim();
    if trimmed.is_empty() {
        return Err(malformed(
            "The API key is empty. Use exactly one header of the form `Authorization: Bearer YOUR_KEY`.",
        ));
    }
    if trimmed.len() != key.len() {
        return Err(Rejection::new(Reason::ApiKeyWhitespace));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(malformed("The API key is too long."));
    }
    if key
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(malformed(
            "The API key contains whitespace. Use exactly one header of the form `Authorization: Bearer YOUR_KEY`.",
        ));
    }
    Ok(key)
}

fn query_key<'u>(uri: &'u Uri, name: &str) -> Result<Option<Cow<'u, str>>, Rejection> {
    let Some(query) = uri.query() else {
        return Ok(None);
    };
    let mut found = None;
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k != name {
            continue;
        }
        if found.is_some() {
            return Err(malformed(
                "The query string has the API key parameter several times. Send exactly one.",
            ));
        }
        found = Some(
            percent_decode(v)
                .ok_or_else(|| malformed("The API key in the query string is not valid UTF-8."))?,
        );
    }
    Ok(found)
}

fn percent_decode(s: &str) -> Option<Cow<'_, str>> {
    if !s.bytes().any(|b| b == b'%' || b == b'+') {
        return Some(Cow::Borrowed(s));
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

/// The request's URI without the key parameter.
pub(crate) fn strip_query_param(uri: &Uri, name: &str) -> Option<Uri> {
    let query = uri.query()?;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| pair.split_once('=').map_or(*pair, |(k, _)| k) != name)
        .collect();
    let mut path_and_query = uri.path().to_owned();
    if !kept.is_empty() {
        path_and_query.push('?');
        path_and_query.push_str(&kept.join("&"));
    }
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse().ok()?);
    Uri::from_parts(parts).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes() {
        assert_eq!(percent_decode("a%20b+c").unwrap(), "a b c");
        assert_eq!(percent_decode("abc").unwrap(), "abc");
        assert!(percent_decode("a%zz").is_none());
        assert!(percent_decode("a%2").is_none());
    }

    #[test]
    fn strips() {
        let uri: Uri = "/v1/x?a=1&api_key=secret&b=2".parse().unwrap();
        assert_eq!(strip_query_param(&uri, "api_key").unwrap(), "/v1/x?a=1&b=2");
        let uri: Uri = "/v1/x?api_key=secret".parse().unwrap();
        assert_eq!(strip_query_param(&uri, "api_key").unwrap(), "/v1/x");
    }
}
