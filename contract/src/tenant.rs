//! Tenant names: the label values and ledger keys every part agrees on.

/// Tenant that receives GPU time and energy nobody holds.
pub const TENANT_IDLE: &str = "_idle";
/// Tenant of processes no rule matched, and of bytes no probe could place.
pub const TENANT_UNATTRIBUTED: &str = "_unattributed";

/// Tenant names become label values and ledger keys: keep them printable
/// and bounded. Names starting with `_` are Tally's own (`_idle`, …).
pub fn check_tenant_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 128 {
        return Err(format!(
            "tenant name must be 1..=128 characters, got {}",
            name.len()
        ));
    }
    if name.starts_with('_') {
        return Err(format!(
            "tenant name `{name}` starts with `_`, which Tally reserves"
        ));
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(format!("tenant name contains a control character {c:?}"));
    }
    Ok(())
}

/// Writes `value` into a metrics exposition as a label value, escaped as
/// the Prometheus text format and OpenMetrics require: `\\`, `\"` and
/// `\n`. Names are checked for control characters only, so a tenant or a
/// node may carry a quote or a backslash (a cgroup named after a systemd
/// unit carries `\x2d`); unescaped, one such name makes the whole scrape
/// unreadable.
pub fn write_label_value(out: &mut impl std::fmt::Write, value: &str) -> std::fmt::Result {
    let mut rest = value;
    // All three are ASCII, so where one is found is a char boundary.
    while let Some(at) = first_to_escape(rest.as_bytes()) {
        out.write_str(&rest[..at])?;
        out.write_str(match rest.as_bytes()[at] {
            b'\\' => "\\\\",
            b'"' => "\\\"",
            _ => "\\n",
        })?;
        rest = &rest[at + 1..];
    }
    out.write_str(rest)
}

/// `value` as [`write_label_value`] writes it: borrowed when nothing in it
/// needs escaping, as nearly every name. For a value written many times.
pub fn escape_label_value(value: &str) -> std::borrow::Cow<'_, str> {
    if first_to_escape(value.as_bytes()).is_none() {
        return value.into();
    }
    let mut out = String::with_capacity(value.len() + 2);
    // Writing into a String cannot fail.
    let _ = write_label_value(&mut out, value);
    out.into()
}

/// Where the first byte to escape is. Every label value of every scrape
/// is searched, most of them short: eight bytes at a time, by the
/// has-a-zero-byte trick on the word XORed with each byte sought (the
/// lowest flagged byte is always a true match). memchr's `memchr3` cost
/// more per call than it saved on such values, and a byte-by-byte loop
/// made the agent's render 64 % dearer (callgrind, BENCHMARKS § 2).
fn first_to_escape(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGHS: u64 = ONES << 7;
    let zero_bytes = |w: u64| w.wrapping_sub(ONES) & !w & HIGHS;
    let mut words = bytes.chunks_exact(8);
    let mut at = 0;
    for word in &mut words {
        let w = u64::from_le_bytes(word.try_into().expect("eight bytes"));
        let found = zero_bytes(w ^ (ONES * u64::from(b'\\')))
            | zero_bytes(w ^ (ONES * u64::from(b'"')))
            | zero_bytes(w ^ (ONES * u64::from(b'\n')));
        if found != 0 {
            return Some(at + found.trailing_zeros() as usize / 8);
        }
        at += 8;
    }
    let tail = words.remainder();
    tail.iter()
        .position(|b| matches!(b, b'\\' | b'"' | b'\n'))
        .map(|p| at + p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let written = |value: &str| {
            let mut out = String::new();
            write_label_value(&mut out, value).unwrap();
            out
        };
        assert_eq!(written("plain-name"), "plain-name");
        assert!(matches!(
            escape_label_value("plain-name"),
            std::borrow::Cow::Borrowed("plain-name")
        ));
        assert_eq!(escape_label_value("a\"b"), written("a\"b"));
        assert_eq!(written(""), "");
        assert_eq!(
            written("dev-disk-by\\x2duuid \"q\"\nend\\"),
            r#"dev-disk-by\\x2duuid \"q\"\nend\\"#
        );
    }

    /// Each byte sought, at every place in and across the eight-byte
    /// words, among bytes that are one off from it (the trick's borrows).
    #[test]
    fn the_first_byte_to_escape_is_found_wherever_it_is() {
        for sought in [b'\\', b'"', b'\n'] {
            for len in 0..20 {
                let plain: Vec<u8> = (0..len)
                    .map(|i| [b'a', sought + 1, b'\x80'][i % 3])
                    .collect();
                assert_eq!(first_to_escape(&plain), None, "{plain:?}");
                for at in 0..len {
                    let mut v = plain.clone();
                    v[at] = sought;
                    if at + 1 < len {
                        v[at + 1] = sought;
                    }
                    assert_eq!(first_to_escape(&v), Some(at), "{v:?}");
                }
            }
        }
    }

    #[test]
    fn reserved_tenant_names_are_refused() {
        assert!(check_tenant_name("acme").is_ok());
        assert!(check_tenant_name("_idle").is_err());
        assert!(check_tenant_name("").is_err());
        assert!(check_tenant_name("a\nb").is_err());
    }
}
