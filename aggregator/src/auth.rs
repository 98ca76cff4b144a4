//! Bearer tokens: who is asking, and what they may do.
//!
//! Tokens are kept as SHA-256 digests and a presented token is compared
//! with every known digest in constant time, so neither the comparison nor
//! which entry matched leaks through timing. Tokens are never logged.

use hyper::{HeaderMap, header::AUTHORIZATION};
use sha2::{Digest, Sha256};

use crate::config::{Role, TokenSpec};

/// What went wrong with a request's credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AuthError {
    /// No usable `Authorization: Bearer` header, or an unknown token: 401.
    #[error("missing or unknown bearer token")]
    Unauthenticated,
    /// A known token without the right to do this: 403.
    #[error("this token may not {action}")]
    Forbidden { action: &'static str },
}

/// The known tokens.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tokens {
    entries: Vec<([u8; 32], Role)>,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Equal without an early exit.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

impl Tokens {
    pub(crate) fn new(specs: &[TokenSpec]) -> Self {
        let entries = specs
            .iter()
            .flat_map(|s| s.tokens.iter().map(|t| (digest(t), s.role.clone())))
            .collect();
        Self { entries }
    }

    /// The role of the request's bearer token.
    pub(crate) fn authenticate(&self, headers: &HeaderMap) -> Result<Role, AuthError> {
        let presented = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or(AuthError::Unauthenticated)?;
        let d = digest(presented);
        let mut found = None;
        // Look at every entry whatever matches, so timing says nothing.
        for (known, role) in &self.entries {
            if ct_eq(known, &d) && found.is_none() {
                found = Some(role.clone());
            }
        }
        found.ok_or(AuthError::Unauthenticated)
    }
}

impl Role {
    /// May write reports.
    pub(crate) fn may_write(&self) -> Result<(), AuthError> {
        match self {
            Role::Agent | Role::Admin => Ok(()),
            Role::Tenant(_) => Err(AuthError::Forbidden {
                action: "write reports",
            }),
        }
    }

    /// May read; returns the tenant the reader is limited to, if any.
    /// `asked` is the tenant named in the query, if any.
    pub(crate) fn may_read(&self, asked: Option<&str>) -> Result<Option<String>, AuthError> {
        match self {
            Role::Agent => Err(AuthError::Forbidden {
                action: "read (agent tokens only write reports)",
            }),
            Role::Admin => Ok(asked.map(str::to_owned)),
            Role::Tenant(t) => match asked {
                Some(a) if a != t => Err(AuthError::Forbidden {
                    action: "read another tenant's data",
                }),
                _ => Ok(Some(t.clone())),
            },
        }
    }

    /// Admin only.
    pub(crate) fn must_be_admin(&self) -> Result<(), AuthError> {
        match self {
            Role::Admin => Ok(()),
            _ => Err(AuthError::Forbidden {
                action: "do this (admin only)",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use hyper::header::HeaderValue;

    use super::*;

    fn tokens() -> Tokens {
        Tokens::new(&[
            TokenSpec {
                token_file: PathBuf::new(),
                role: Role::Agent,
                tokens: vec!["agent-token-0123456789".into()],
            },
            TokenSpec {
                token_file: PathBuf::new(),
                role: Role::Tenant("acme".into()),
                tokens: vec!["acme-token-0123456789".into()],
            },
        ])
    }

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn roles_and_scopes() {
        let t = tokens();
        assert_eq!(
            t.authenticate(&HeaderMap::new()),
            Err(AuthError::Unauthenticated)
        );
        assert_eq!(
            t.authenticate(&headers("Bearer nope")),
            Err(AuthError::Unauthenticated)
        );
        assert_eq!(
            t.authenticate(&headers("Basic agent-token-0123456789")),
            Err(AuthError::Unauthenticated)
        );
        let agent = t
            .authenticate(&headers("Bearer agent-token-0123456789"))
            .unwrap();
        assert!(agent.may_write().is_ok());
        assert!(agent.may_read(None).is_err());
        let acme = t
            .authenticate(&headers("Bearer acme-token-0123456789"))
            .unwrap();
        assert!(acme.may_write().is_err());
        assert_eq!(acme.may_read(None).unwrap().as_deref(), Some("acme"));
        assert!(acme.may_read(Some("globex")).is_err());
        assert_eq!(Role::Admin.may_read(None).unwrap(), None);
    }
}
