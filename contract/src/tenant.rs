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
    while let Some(at) = rest.find(['\\', '"', '\n']) {
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
        assert_eq!(written(""), "");
        assert_eq!(
            written("dev-disk-by\\x2duuid \"q\"\nend\\"),
            r#"dev-disk-by\\x2duuid \"q\"\nend\\"#
        );
    }

    #[test]
    fn reserved_tenant_names_are_refused() {
        assert!(check_tenant_name("acme").is_ok());
        assert!(check_tenant_name("_idle").is_err());
        assert!(check_tenant_name("").is_err());
        assert!(check_tenant_name("a\nb").is_err());
    }
}
