//! Query strings of the read endpoints.

use std::collections::HashMap;

use hyper::{Request, body::Incoming};

/// The query parameters of `req`, decoded (a repeated key: the last wins).
pub(super) fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .map(|q| {
            q.split('&')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Decodes `%XX` escapes and `+` (form encoding).
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::{parse_time, rfc3339};

    #[test]
    fn times_and_escapes() {
        assert_eq!(parse_time("10").unwrap(), 10_000);
        assert_eq!(parse_time("1970-01-01T00:00:10Z").unwrap(), 10_000);
        assert!(parse_time("yesterday").is_err());
        assert_eq!(percent_decode("tenant%2Cnode"), "tenant,node");
        assert_eq!(percent_decode("a+b%"), "a b%");
        assert_eq!(rfc3339(10_000), "1970-01-01T00:00:10Z");
    }
}
