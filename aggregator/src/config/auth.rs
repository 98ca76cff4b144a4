//! `[auth]` and `[audit]` of the aggregator's config: who holds which
//! token, how fast each token may ask, and where the nodes' audit keys
//! are. Token files are read here, at start and on every reload, and only
//! their SHA-256 digests are kept.

use std::{collections::BTreeMap, num::NonZeroU32, path::PathBuf, time::Duration};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tally_contract::{
    config::{Problems, reject_unknown},
    tenant::check_tenant_name,
};

/// Who a token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Role {
    /// May only write reports.
    Agent,
    /// May read and write everything.
    Admin,
    /// May read its own tenant's lines only.
    Tenant(String),
}

/// SHA-256 of a token: all the aggregator keeps of it.
pub(crate) type TokenDigest = [u8; 32];

/// The digest of `token`.
pub(crate) fn token_digest(token: &str) -> TokenDigest {
    Sha256::digest(token.as_bytes()).into()
}

/// One `[[auth.token]]` after validation.
#[derive(Debug, Clone)]
pub(crate) struct TokenSpec {
    /// Where the tokens come from: read again on reload.
    pub token_file: PathBuf,
    pub role: Role,
    /// Digests of the file's tokens (one per non-empty, non-`#` line).
    pub digests: Vec<TokenDigest>,
}

/// `[auth] rate_limit` and `burst`: each token's own allowance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RateLimit {
    /// Time to earn one request back.
    pub period: Duration,
    /// Requests a token may make at once after a quiet spell.
    pub burst: NonZeroU32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    token_file: Option<PathBuf>,
    role: Option<String>,
    tenant: Option<String>,
}

/// Shortest token accepted: guessable tokens are no access control.
pub(crate) const MIN_TOKEN_LEN: usize = 16;

/// `[auth]`: the tokens and the per-token rate limit.
pub(super) fn auth_section(
    table: &mut toml::Table,
    problems: &mut Problems,
) -> (Vec<TokenSpec>, Option<RateLimit>) {
    let mut out = Vec::new();
    let Some(value) = table.remove("auth") else {
        problems.push(
            "auth.token",
            "no [[auth.token]]: every request would be refused; add an agent and an admin token",
        );
        return (out, None);
    };
    let toml::Value::Table(mut auth) = value else {
        problems.push("auth", "must be a table");
        return (out, None);
    };
    match auth.remove("token") {
        Some(toml::Value::Array(items)) => {
            for (i, item) in items.into_iter().enumerate() {
                let key = format!("auth.token[{i}]");
                match TokenEntry::deserialize(item) {
                    Ok(e) => {
                        if let Some(spec) = token_entry(e, &key, problems) {
                            out.push(spec);
                        }
                    }
                    Err(e) => problems.push(key, e.message().to_string()),
                }
            }
        }
        Some(_) => problems.push("auth.token", "must be an array of tables ([[auth.token]])"),
        None => problems.push(
            "auth.token",
            "no [[auth.token]]: add an agent and an admin token",
        ),
    }
    let limit = rate_limit(&mut auth, problems);
    reject_unknown(&auth, "auth", &["token", "rate_limit", "burst"], problems);
    for (i, j) in duplicates(&out) {
        problems.push(
            format!("auth.token[{i}].token_file"),
            format!("holds a token that auth.token[{j}] also holds: roles would be ambiguous"),
        );
    }
    (out, limit)
}

/// `(i, j)` for each token of entry `i` that entry `j < i` also holds.
fn duplicates(specs: &[TokenSpec]) -> Vec<(usize, usize)> {
    let mut seen: BTreeMap<&TokenDigest, usize> = BTreeMap::new();
    let mut out = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        for d in &spec.digests {
            if let Some(j) = seen.insert(d, i) {
                out.push((i, j));
            }
        }
    }
    out
}

/// `rate_limit = "50/s"` (per `s`, `m` or `h`) and `burst = N` (default:
/// the rate's count). Both keys are taken out of `auth` before either is
/// checked, so a bad one is reported once, never also as an unknown key.
fn rate_limit(auth: &mut toml::Table, problems: &mut Problems) -> Option<RateLimit> {
    let burst = auth.remove("burst");
    let rate = auth.remove("rate_limit");
    let burst = match burst {
        None => None,
        Some(toml::Value::Integer(n)) => match u32::try_from(n).ok().and_then(NonZeroU32::new) {
            Some(n) => Some(n),
            None => {
                problems.push("auth.burst", "must be a whole number ≥ 1");
                return None;
            }
        },
        Some(_) => {
            problems.push("auth.burst", "must be a whole number ≥ 1");
            return None;
        }
    };
    let rate = match rate {
        None => {
            if burst.is_some() {
                problems.push("auth.burst", "needs auth.rate_limit");
            }
            return None;
        }
        Some(toml::Value::String(s)) => s,
        Some(_) => {
            problems.push("auth.rate_limit", "must be a string such as \"50/s\"");
            return None;
        }
    };
    match parse_rate(&rate) {
        // A period under a nanosecond rounds to zero, which the limiter
        // cannot take (`Quota::with_period` gives `None`): the limit would
        // silently be off.
        Ok((count, per)) if (per / count.get()).is_zero() => {
            problems.push(
                "auth.rate_limit",
                format!(
                    "`{rate}` is faster than one request per nanosecond; write at most 1000000000/s"
                ),
            );
            None
        }
        Ok((count, per)) => Some(RateLimit {
            period: per / count.get(),
            burst: burst.unwrap_or(count),
        }),
        Err(e) => {
            problems.push("auth.rate_limit", e);
            None
        }
    }
}

/// `N/s`, `N/m` or `N/h`: N requests per unit.
pub(crate) fn parse_rate(s: &str) -> Result<(NonZeroU32, Duration), String> {
    let bad =
        || format!("`{s}` is not a rate: write requests per second, minute or hour, e.g. \"50/s\"");
    let (n, unit) = s.split_once('/').ok_or_else(bad)?;
    let n: NonZeroU32 = n.trim().parse().map_err(|_| bad())?;
    let per = match unit.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        _ => return Err(bad()),
    };
    Ok((n, per))
}

fn token_entry(e: TokenEntry, key: &str, problems: &mut Problems) -> Option<TokenSpec> {
    let role = match (e.role.as_deref(), e.tenant) {
        (Some("agent"), None) => Role::Agent,
        (Some("admin"), None) => Role::Admin,
        (Some("tenant"), Some(t)) => {
            if let Err(msg) = check_tenant_name(&t) {
                problems.push(format!("{key}.tenant"), msg);
                return None;
            }
            Role::Tenant(t)
        }
        (Some("tenant"), None) => {
            problems.push(
                format!("{key}.tenant"),
                "a tenant token needs `tenant = \"…\"`",
            );
            return None;
        }
        (Some("agent" | "admin"), Some(_)) => {
            problems.push(
                format!("{key}.tenant"),
                "only `role = \"tenant\"` takes a tenant",
            );
            return None;
        }
        (Some(other), _) => {
            problems.push(
                format!("{key}.role"),
                format!("`{other}` is not a role; use agent, admin or tenant"),
            );
            return None;
        }
        (None, _) => {
            problems.push(format!("{key}.role"), "missing: agent, admin or tenant");
            return None;
        }
    };
    let Some(file) = e.token_file else {
        problems.push(format!("{key}.token_file"), "missing");
        return None;
    };
    match read_digests(&file) {
        Ok(digests) => Some(TokenSpec {
            token_file: file,
            role,
            digests,
        }),
        Err(e) => {
            problems.push(format!("{key}.token_file"), e);
            None
        }
    }
}

/// The digests of a token file's tokens; the text is dropped at once.
fn read_digests(file: &std::path::Path) -> Result<Vec<TokenDigest>, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|err| format!("cannot read {}: {err}", file.display()))?;
    let tokens: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    if tokens.is_empty() {
        return Err(format!("{} holds no token", file.display()));
    }
    if tokens.iter().any(|t| t.len() < MIN_TOKEN_LEN) {
        return Err(format!(
            "{}: every token must be at least {MIN_TOKEN_LEN} characters",
            file.display()
        ));
    }
    Ok(tokens.into_iter().map(token_digest).collect())
}

/// Reads every token file of `specs` again (a reload): the new digests, or
/// every problem found, in which case the caller keeps the old ones.
pub(crate) fn reread(specs: &[TokenSpec]) -> Result<Vec<TokenSpec>, Vec<String>> {
    let mut problems = Vec::new();
    let mut out = Vec::with_capacity(specs.len());
    for (i, s) in specs.iter().enumerate() {
        match read_digests(&s.token_file) {
            Ok(digests) => out.push(TokenSpec {
                token_file: s.token_file.clone(),
                role: s.role.clone(),
                digests,
            }),
            Err(e) => problems.push(format!("auth.token[{i}].token_file: {e}")),
        }
    }
    for (i, j) in duplicates(&out) {
        problems.push(format!(
            "auth.token[{i}].token_file holds a token that auth.token[{j}] also holds"
        ));
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// `[audit]`: the nodes' audit keys.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct AuditSection {
    /// A directory of `<node>.key` files, each a copy of that node's
    /// `<state_dir>/audit.key`. Unset: keyed audit records are checked by
    /// their plain chain only.
    pub node_keys: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_and_bad_ones_are_named() {
        assert_eq!(
            parse_rate("50/s").unwrap(),
            (NonZeroU32::new(50).unwrap(), Duration::from_secs(1))
        );
        assert_eq!(parse_rate("600 / min").unwrap().1, Duration::from_secs(60));
        for bad in ["50", "0/s", "x/s", "5/fortnight", "-1/s"] {
            assert!(parse_rate(bad).unwrap_err().contains("not a rate"), "{bad}");
        }
    }

    #[test]
    fn a_rate_limit_and_burst_are_read_and_checked() {
        let read = |text: &str| {
            let mut t: toml::Table = text.parse().unwrap();
            let mut p = Problems {
                file: "a.toml".into(),
                problems: Vec::new(),
            };
            (rate_limit(&mut t, &mut p), p)
        };
        let (l, p) = read("rate_limit = \"50/s\"");
        assert!(p.problems.is_empty());
        let l = l.unwrap();
        assert_eq!((l.period, l.burst.get()), (Duration::from_millis(20), 50));
        let (l, _) = read("rate_limit = \"2/s\"\nburst = 7");
        assert_eq!(l.unwrap().burst.get(), 7);
        let (l, p) = read("burst = 7");
        assert!(l.is_none());
        assert_eq!(p.problems[0].key, "auth.burst");
        let (_, p) = read("rate_limit = \"fast\"");
        assert_eq!(p.problems[0].key, "auth.rate_limit");
        let (_, p) = read("rate_limit = \"5/s\"\nburst = 0");
        assert_eq!(p.problems[0].key, "auth.burst");
    }

    #[test]
    fn a_bad_burst_is_one_problem_and_too_fast_a_rate_is_another() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("agents");
        std::fs::write(&f, "agent-token-0123456789\n").unwrap();
        let read = |auth: &str| {
            let text = format!(
                "[auth]\n{auth}\n[[auth.token]]\ntoken_file = {:?}\nrole = \"agent\"\n",
                f.display().to_string()
            );
            let mut t: toml::Table = text.parse().unwrap();
            let mut p = Problems {
                file: "a.toml".into(),
                problems: Vec::new(),
            };
            let (specs, limit) = auth_section(&mut t, &mut p);
            assert_eq!(specs.len(), 1);
            (limit, p.problems)
        };
        let (l, p) = read("rate_limit = \"5/s\"\nburst = 0");
        assert!(l.is_none());
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "auth.burst");
        let (l, p) = read("rate_limit = \"2000000000/s\"");
        assert!(l.is_none());
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "auth.rate_limit");
        let (l, p) = read("rate_limit = \"1000000000/s\"");
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(l.unwrap().period, Duration::from_nanos(1));
        let (_, p) = read("rate = \"5/s\"");
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].message.contains("token, rate_limit, burst"), "{p:?}");
    }

    #[test]
    fn a_reread_takes_new_tokens_or_names_every_problem() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("agents");
        std::fs::write(&f, "old-token-0123456789\n").unwrap();
        let specs = vec![TokenSpec {
            token_file: f.clone(),
            role: Role::Agent,
            digests: read_digests(&f).unwrap(),
        }];
        std::fs::write(&f, "new-token-0123456789\n# a comment\n").unwrap();
        let new = reread(&specs).unwrap();
        assert_eq!(new[0].digests, [token_digest("new-token-0123456789")]);
        std::fs::write(&f, "short\n").unwrap();
        let e = reread(&specs).unwrap_err();
        assert!(
            e[0].contains("auth.token[0]") && e[0].contains("16"),
            "{e:?}"
        );
        std::fs::remove_file(&f).unwrap();
        assert!(reread(&specs).unwrap_err()[0].contains("cannot read"));
    }
}
