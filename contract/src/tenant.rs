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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_tenant_names_are_refused() {
        assert!(check_tenant_name("acme").is_ok());
        assert!(check_tenant_name("_idle").is_err());
        assert!(check_tenant_name("").is_err());
        assert!(check_tenant_name("a\nb").is_err());
    }
}
