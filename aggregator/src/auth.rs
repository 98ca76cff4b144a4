//! Bearer tokens: who is asking, what they may do, and how fast.
//!
//! Tokens are kept as SHA-256 digests, and a presented token is looked up
//! by its digest in a hash map: one lookup whatever the fleet's size (the
//! constant-time comparison with every digest it replaced took 5-7 % of
//! the aggregator's CPU with 1,000 agent tokens, growing with each node).
//! Only digests are compared, so timing can hint at most at a stored
//! digest, from which no token can be found (SHA-256 has no known preimage
//! attack). Tokens are never logged. The set of digests can be replaced
//! while serving (a reload); each token's request rate is limited on its
//! own (`[auth] rate_limit`), so one runaway client cannot starve the
//! others.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter, clock::Clock};
use hyper::{HeaderMap, header::AUTHORIZATION};

use crate::config::{RateLimit, Role, TokenDigest, TokenSpec, token_digest};

/// What went wrong with a request's credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AuthError {
    /// No usable `Authorization: Bearer` header, or an unknown token: 401.
    #[error("missing or unknown bearer token")]
    Unauthenticated,
    /// A known token without the right to do this: 403.
    #[error("this token may not {action}")]
    Forbidden { action: &'static str },
    /// A known token over its `[auth] rate_limit`: 429 with `Retry-After`.
    #[error("this token is over its request rate ([auth] rate_limit); retry in {retry_after_s} s")]
    RateLimited {
        /// Whole seconds until the token may ask again (at least 1).
        retry_after_s: u64,
    },
}

/// The known tokens (digests only, with the files they were read from)
/// and each one's rate limiter.
pub(crate) struct Tokens {
    /// `[[auth.token]]` and their digests' roles: replaced whole on reload.
    known: RwLock<Arc<Known>>,
    /// Keyed by digest, so a token's allowance survives a reload.
    limiter: Option<DefaultKeyedRateLimiter<TokenDigest>>,
}

/// The served `[[auth.token]]` entries and, for each digest, the role of
/// the first entry holding it.
struct Known {
    specs: Vec<TokenSpec>,
    roles: HashMap<TokenDigest, Role>,
}

impl Known {
    fn new(specs: Vec<TokenSpec>) -> Arc<Self> {
        let mut roles = HashMap::new();
        for spec in &specs {
            for d in &spec.digests {
                roles.entry(*d).or_insert_with(|| spec.role.clone());
            }
        }
        Arc::new(Self { specs, roles })
    }
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("tokens", &self.len())
            .field("rate_limited", &self.limiter.is_some())
            .finish()
    }
}

impl Tokens {
    pub(crate) fn new(specs: Vec<TokenSpec>, limit: Option<RateLimit>) -> Self {
        let limiter = limit.and_then(|l| {
            Quota::with_period(l.period).map(|q| RateLimiter::keyed(q.allow_burst(l.burst)))
        });
        Self {
            known: RwLock::new(Known::new(specs)),
            limiter,
        }
    }

    /// Serves `specs` from now on (a reload); forgets the allowances of
    /// tokens that have not asked lately.
    pub(crate) fn replace(&self, specs: Vec<TokenSpec>) {
        let known = Known::new(specs);
        *self.known.write().unwrap_or_else(|e| e.into_inner()) = known;
        if let Some(l) = &self.limiter {
            l.retain_recent();
        }
    }

    fn known(&self) -> Arc<Known> {
        self.known.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The `[[auth.token]]` entries served now, to read again on reload.
    pub(crate) fn specs(&self) -> Vec<TokenSpec> {
        self.known().specs.clone()
    }

    /// The token files, to see whether one changed.
    pub(crate) fn files(&self) -> Vec<PathBuf> {
        self.known()
            .specs
            .iter()
            .map(|s| s.token_file.clone())
            .collect()
    }

    /// How many tokens are known.
    pub(crate) fn len(&self) -> usize {
        self.known().specs.iter().map(|s| s.digests.len()).sum()
    }

    /// The role of the request's bearer token, if it is within its rate.
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
        let d = token_digest(presented);
        let role = self
            .known()
            .roles
            .get(&d)
            .cloned()
            .ok_or(AuthError::Unauthenticated)?;
        if let Some(limiter) = &self.limiter
            && let Err(not_until) = limiter.check_key(&d)
        {
            let wait = not_until.wait_time_from(limiter.clock().now());
            return Err(AuthError::RateLimited {
                retry_after_s: retry_after_secs(wait),
            });
        }
        Ok(role)
    }
}

/// `Retry-After` takes whole seconds: round up, and never say 0.
fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
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

    fn specs(agent: &str) -> Vec<TokenSpec> {
        vec![
            TokenSpec {
                token_file: PathBuf::new(),
                role: Role::Agent,
                digests: vec![token_digest(agent)],
            },
            TokenSpec {
                token_file: PathBuf::new(),
                role: Role::Tenant("acme".into()),
                digests: vec![token_digest("acme-token-0123456789")],
            },
        ]
    }

    fn tokens() -> Tokens {
        Tokens::new(specs("agent-token-0123456789"), None)
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

    /// A fleet's worth of tokens: each finds its own entry's role, and a
    /// token one character off finds none.
    #[test]
    fn each_of_many_tokens_finds_its_own_role() {
        let specs: Vec<TokenSpec> = (0..2000)
            .map(|n| TokenSpec {
                token_file: PathBuf::new(),
                role: Role::Tenant(format!("t{n}")),
                digests: vec![token_digest(&format!("token-of-tenant-{n:05}"))],
            })
            .collect();
        let t = Tokens::new(specs, None);
        assert_eq!(t.len(), 2000);
        for n in [0, 1, 999, 1999] {
            let role = t.authenticate(&headers(&format!("Bearer token-of-tenant-{n:05}")));
            assert_eq!(role, Ok(Role::Tenant(format!("t{n}"))), "{n}");
        }
        assert_eq!(
            t.authenticate(&headers("Bearer token-of-tenant-02000")),
            Err(AuthError::Unauthenticated)
        );
    }

    #[test]
    fn a_replaced_set_takes_new_tokens_and_drops_old_ones() {
        let t = tokens();
        t.replace(specs("rotated-token-0123456789"));
        assert_eq!(
            t.authenticate(&headers("Bearer agent-token-0123456789")),
            Err(AuthError::Unauthenticated)
        );
        assert_eq!(
            t.authenticate(&headers("Bearer rotated-token-0123456789")),
            Ok(Role::Agent)
        );
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn each_token_has_its_own_rate() {
        let limit = RateLimit {
            period: Duration::from_secs(10),
            burst: std::num::NonZeroU32::new(2).unwrap(),
        };
        let t = Tokens::new(specs("agent-token-0123456789"), Some(limit));
        let agent = headers("Bearer agent-token-0123456789");
        assert!(t.authenticate(&agent).is_ok());
        assert!(t.authenticate(&agent).is_ok());
        match t.authenticate(&agent) {
            Err(AuthError::RateLimited { retry_after_s }) => {
                assert!((1..=10).contains(&retry_after_s), "{retry_after_s}")
            }
            other => panic!("expected 429, got {other:?}"),
        }
        // Another token is still served; an unknown one is not counted.
        assert!(
            t.authenticate(&headers("Bearer acme-token-0123456789"))
                .is_ok()
        );
        assert_eq!(
            t.authenticate(&headers("Bearer nope")),
            Err(AuthError::Unauthenticated)
        );
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_secs(Duration::from_millis(2001)), 3);
    }
}
