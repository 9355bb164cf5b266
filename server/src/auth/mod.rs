//! Who may do what: principals, their credentials and the policy that
//! grants them permissions. Transport-agnostic: it reads request headers
//! and the connection's client-certificate identity (put in the request's
//! extensions by whatever accepted the connection), and answers with
//! `tonic::Status` codes.
//!
//! - [`Auth::authenticate`] turns a request into a [`Principal`] (a bearer
//!   JWT verified against the JWKS, a static token found in the token file,
//!   or the client certificate's URI/DNS SAN) or `UNAUTHENTICATED`;
//!   [`layer::AuthLayer`] does it for every route and puts the principal in
//!   the request's extensions.
//! - The handlers ask [`Auth::check_publish`], [`Auth::check_subscribe`],
//!   [`Auth::check_status`]: `PERMISSION_DENIED` naming what was refused.
//! - A subscribe stream keeps an [`Access`], which it rechecks when the
//!   policy generation moves (files reloaded): a revoked node's stream ends
//!   with `PERMISSION_DENIED`.
//!
//! Without any auth source (no JWKS, no token file, no client CA) every
//! caller is the anonymous principal with every permission: a hub on
//! loopback stays as simple as it was.

pub mod credentials;
pub mod layer;
pub mod policy;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use tonic::Status;

pub use credentials::{Jwks, Rejected, Tokens, token_hash};
pub use policy::{Grants, Permission, Policy};

/// Counter of refused calls, by reason.
pub const AUTH_DENIED: &str = "freshness_auth_denied_total";
/// Reason label values of [`AUTH_DENIED`].
pub const DENIAL_REASONS: [&str; 12] = [
    "no_credentials",
    "token_expired",
    "token_not_yet_valid",
    "token_bad_signature",
    "token_wrong_audience",
    "token_malformed",
    "token_unknown",
    "publish",
    "subscribe",
    "status",
    "replicate",
    "revoked",
];

/// How often one principal's denials are logged at most.
const LOG_EVERY: Duration = Duration::from_secs(60);
/// Principals remembered for that; past it the memory starts over.
const LOG_MEMORY: usize = 4096;

/// How a principal proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// No auth configured: everyone is this one, with every right.
    Anonymous,
    /// The client certificate's URI or DNS SAN.
    Certificate,
    /// A JWT's `sub`.
    Jwt,
    /// A static token's name.
    Token,
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The name the policy grants permissions to.
    pub name: String,
    /// How it was established.
    pub source: Source,
    /// Permissions the credential itself carries (a JWT's `permissions`).
    pub carried: Grants,
}

impl Principal {
    /// The caller of a hub without authentication.
    pub fn anonymous() -> Self {
        Self {
            name: "anonymous".into(),
            source: Source::Anonymous,
            carried: Grants::all(),
        }
    }
}

/// The identity of the client certificate a connection presented and the
/// hub verified, put in every request's extensions by the acceptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateIdentity(pub Arc<str>);

/// Where the credentials and the policy come from.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// `auth_jwks`.
    pub jwks: Option<PathBuf>,
    /// `auth_tokens`.
    pub tokens: Option<PathBuf>,
    /// `auth_policy`.
    pub policy: Option<PathBuf>,
    /// `auth_audience`: what a JWT's `aud` must hold.
    pub audience: Vec<String>,
    /// Client certificates are required and verified (`tls_client_ca`).
    pub client_certificates: bool,
}

impl Sources {
    /// Whether callers must authenticate.
    pub fn enabled(&self) -> bool {
        self.jwks.is_some() || self.tokens.is_some() || self.client_certificates
    }

    /// Every file to watch for changes.
    pub fn files(&self) -> Vec<PathBuf> {
        [&self.jwks, &self.tokens, &self.policy]
            .into_iter()
            .flatten()
            .cloned()
            .collect()
    }
}

/// What the files said at the last (successful) load.
#[derive(Debug, Default)]
struct Loaded {
    jwks: Option<Jwks>,
    tokens: Option<Tokens>,
    policy: Policy,
}

/// The hub's authentication and authorization state.
#[derive(Debug)]
pub struct Auth {
    sources: Sources,
    loaded: RwLock<Arc<Loaded>>,
    /// Moves on every reload; sessions recheck their rights when it does.
    generation: AtomicU64,
    /// When each principal's denial was last logged.
    logged: Mutex<HashMap<String, tokio::time::Instant>>,
}

impl Auth {
    /// No authentication: every caller may do everything.
    pub fn disabled() -> Arc<Self> {
        Arc::new(Self {
            sources: Sources::default(),
            loaded: RwLock::new(Arc::new(Loaded::default())),
            generation: AtomicU64::new(0),
            logged: Mutex::new(HashMap::new()),
        })
    }

    /// Reads every configured file; an unreadable or invalid one is an
    /// error naming it (the hub does not start).
    pub fn load(sources: Sources) -> Result<Arc<Self>, String> {
        let loaded = Self::read(&sources)?;
        Ok(Arc::new(Self {
            sources,
            loaded: RwLock::new(Arc::new(loaded)),
            generation: AtomicU64::new(0),
            logged: Mutex::new(HashMap::new()),
        }))
    }

    fn read(sources: &Sources) -> Result<Loaded, String> {
        Ok(Loaded {
            jwks: match &sources.jwks {
                Some(p) => Some(Jwks::load(p, &sources.audience)?),
                None => None,
            },
            tokens: sources.tokens.as_deref().map(Tokens::load).transpose()?,
            policy: match &sources.policy {
                Some(p) => Policy::load(p)?,
                None => Policy::default(),
            },
        })
    }

    /// Reads the files again. A file that does not load keeps the last good
    /// state (logged); a good load moves the generation, so every session
    /// rechecks its rights.
    pub fn reload(&self) {
        if !self.sources.enabled() && self.sources.policy.is_none() {
            return;
        }
        match Self::read(&self.sources) {
            Ok(loaded) => {
                *self.loaded.write() = Arc::new(loaded);
                self.generation.fetch_add(1, Ordering::AcqRel);
                tracing::info!("auth files reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "auth files not reloaded; keeping the last good ones")
            }
        }
    }

    /// The files to watch.
    pub fn files(&self) -> Vec<PathBuf> {
        self.sources.files()
    }

    /// Whether callers must authenticate.
    pub fn enabled(&self) -> bool {
        self.sources.enabled()
    }

    /// The current generation.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Who is calling: a bearer token in `authorization` first, else the
    /// connection's client certificate. `UNAUTHENTICATED` when neither
    /// proves anyone (and auth is on).
    pub fn authenticate(
        &self,
        headers: &http::HeaderMap,
        certificate: Option<&CertificateIdentity>,
    ) -> Result<Principal, Status> {
        if !self.enabled() {
            return Ok(Principal::anonymous());
        }
        if let Some(value) = headers.get(http::header::AUTHORIZATION) {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| {
                    v.strip_prefix("Bearer ")
                        .or_else(|| v.strip_prefix("bearer "))
                })
                .map(str::trim)
                .filter(|t| !t.is_empty());
            let Some(token) = token else {
                return Err(self.unauthenticated(
                    "token_malformed",
                    "authorization must be \"Bearer <token>\"",
                ));
            };
            return self
                .bearer(token)
                .map_err(|r| self.unauthenticated(r.label(), r.message()));
        }
        if let Some(CertificateIdentity(name)) = certificate {
            return Ok(Principal {
                name: name.to_string(),
                source: Source::Certificate,
                carried: Grants::default(),
            });
        }
        Err(self.unauthenticated(
            "no_credentials",
            "no credentials: send a bearer token or a client certificate",
        ))
    }

    fn bearer(&self, token: &str) -> Result<Principal, Rejected> {
        let loaded = self.loaded.read().clone();
        let looks_like_jwt = token.bytes().filter(|&b| b == b'.').count() == 2;
        if looks_like_jwt && let Some(jwks) = &loaded.jwks {
            let jwt = jwks.verify(token)?;
            let carried = Grants::parse(&jwt.permissions).map_err(|_| Rejected::Malformed)?;
            return Ok(Principal {
                name: jwt.subject,
                source: Source::Jwt,
                carried,
            });
        }
        match loaded.tokens.as_ref().and_then(|t| t.lookup(token)) {
            Some(name) => Ok(Principal {
                name: name.to_owned(),
                source: Source::Token,
                carried: Grants::default(),
            }),
            None if looks_like_jwt && loaded.jwks.is_none() => Err(Rejected::BadSignature),
            None => Err(Rejected::UnknownToken),
        }
    }

    /// Everything `p` may do now: what its credential carries and what the
    /// policy grants its name.
    pub fn grants(&self, p: &Principal) -> Grants {
        let mut g = p.carried.clone();
        if p.source != Source::Anonymous {
            g.extend(&self.loaded.read().policy.grants(&p.name));
        }
        g
    }

    /// A publish whose events are in `namespaces` (in the call's order):
    /// every one must be allowed, else `PERMISSION_DENIED` naming the first
    /// refused event's index and namespace.
    pub fn check_publish<'a>(
        &self,
        p: &Principal,
        namespaces: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), Status> {
        let grants = self.grants(p);
        for (index, ns) in namespaces.into_iter().enumerate() {
            if !grants.may_publish(ns) {
                return Err(self.denied(
                    p,
                    "publish",
                    format!(
                        "{} may not publish to namespace {ns:?} (event {index}); nothing of the call was applied",
                        p.name
                    ),
                ));
            }
        }
        Ok(())
    }

    /// A hello: a replication hello needs `replicate`; a node's filter
    /// (empty: every namespace, which needs `subscribe:*`) must be within
    /// its `subscribe` grants. The [`Access`] rechecks it on reloads.
    pub fn check_subscribe(
        self: &Arc<Self>,
        p: &Principal,
        filter: &[String],
        replication: bool,
    ) -> Result<Access, Status> {
        let access = Access {
            auth: self.clone(),
            principal: p.clone(),
            filter: filter.to_vec(),
            replication,
            generation: self.generation(),
        };
        access
            .allowed(&self.grants(p))
            .map_err(|(reason, message)| self.denied(p, reason, message))?;
        Ok(access)
    }

    /// Status needs `status`.
    pub fn check_status(&self, p: &Principal) -> Result<(), Status> {
        if self.grants(p).may_status() {
            Ok(())
        } else {
            Err(self.denied(p, "status", format!("{} may not read status", p.name)))
        }
    }

    fn unauthenticated(&self, reason: &'static str, message: &str) -> Status {
        metrics::counter!(AUTH_DENIED, "reason" => reason).increment(1);
        self.log_once("(unauthenticated)", reason, message);
        Status::unauthenticated(message)
    }

    /// Counts and (at most once a minute per principal) logs a denial.
    fn denied(&self, p: &Principal, reason: &'static str, message: String) -> Status {
        metrics::counter!(AUTH_DENIED, "reason" => reason).increment(1);
        self.log_once(&p.name, reason, &message);
        Status::permission_denied(message)
    }

    fn log_once(&self, principal: &str, reason: &str, message: &str) {
        let now = tokio::time::Instant::now();
        let mut logged = self.logged.lock();
        if logged
            .get(principal)
            .is_some_and(|at| now.duration_since(*at) < LOG_EVERY)
        {
            return;
        }
        if logged.len() >= LOG_MEMORY {
            logged.clear();
        }
        logged.insert(principal.to_owned(), now);
        drop(logged);
        tracing::warn!(principal, reason, error = message, "call refused");
    }
}

/// A subscribe stream's rights, rechecked when the policy generation moves.
#[derive(Debug)]
pub struct Access {
    auth: Arc<Auth>,
    principal: Principal,
    filter: Vec<String>,
    replication: bool,
    generation: u64,
}

impl Access {
    fn allowed(&self, grants: &Grants) -> Result<(), (&'static str, String)> {
        let name = &self.principal.name;
        if self.replication {
            if !grants.may_replicate() {
                return Err((
                    "replicate",
                    format!("{name} may not replicate from this hub"),
                ));
            }
            return Ok(());
        }
        if self.filter.is_empty() {
            if !grants.may_subscribe(None) {
                return Err((
                    "subscribe",
                    format!(
                        "{name} may not subscribe to every namespace (an empty filter needs subscribe:*)"
                    ),
                ));
            }
            return Ok(());
        }
        for ns in &self.filter {
            if !grants.may_subscribe(Some(ns)) {
                return Err((
                    "subscribe",
                    format!("{name} may not subscribe to namespace {ns:?}"),
                ));
            }
        }
        Ok(())
    }

    /// `Err(PERMISSION_DENIED)` when a reload since the last look took away
    /// a right the stream uses. Cheap when nothing was reloaded (one atomic
    /// load).
    pub fn recheck(&mut self) -> Result<(), Status> {
        let now = self.auth.generation();
        if now == self.generation {
            return Ok(());
        }
        self.generation = now;
        match self.allowed(&self.auth.grants(&self.principal)) {
            Ok(()) => Ok(()),
            Err((_, message)) => {
                Err(self
                    .auth
                    .denied(&self.principal, "revoked", format!("{message} (revoked)")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth_with(policy: &str, tokens: &str) -> (tempfile::TempDir, Arc<Auth>) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("policy.toml");
        let t = dir.path().join("tokens");
        std::fs::write(&p, policy).unwrap();
        std::fs::write(&t, tokens).unwrap();
        let auth = Auth::load(Sources {
            tokens: Some(t),
            policy: Some(p),
            ..Sources::default()
        })
        .unwrap();
        (dir, auth)
    }

    fn bearer(token: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        h
    }

    #[test]
    fn tokens_and_certificates_name_principals() {
        let (_d, auth) = auth_with(
            "[principals]\nwriter = [\"publish:user\"]\n",
            &format!("writer {}\n", token_hash("w")),
        );
        let p = auth.authenticate(&bearer("w"), None).unwrap();
        assert_eq!((p.name.as_str(), p.source), ("writer", Source::Token));
        let e = auth.authenticate(&bearer("x"), None).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let e = auth
            .authenticate(&http::HeaderMap::new(), None)
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let cert = CertificateIdentity("spiffe://x/node".into());
        let p = auth
            .authenticate(&http::HeaderMap::new(), Some(&cert))
            .unwrap();
        assert_eq!(p.source, Source::Certificate);
        // Without any source, everyone is anonymous with every right.
        let open = Auth::disabled();
        let p = open.authenticate(&http::HeaderMap::new(), None).unwrap();
        assert!(open.check_status(&p).is_ok());
    }

    #[test]
    fn publish_denial_names_the_event_index_and_namespace() {
        let (_d, auth) = auth_with(
            "[principals]\nwriter = [\"publish:user\"]\n",
            &format!("writer {}\n", token_hash("w")),
        );
        let p = auth.authenticate(&bearer("w"), None).unwrap();
        assert!(auth.check_publish(&p, ["user", "user"]).is_ok());
        let e = auth.check_publish(&p, ["user", "price"]).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            e.message().contains("\"price\" (event 1)"),
            "{}",
            e.message()
        );
        assert!(auth.check_status(&p).is_err());
    }

    #[test]
    fn a_reload_that_revokes_a_right_fails_the_recheck() {
        let (dir, auth) = auth_with(
            "[principals]\nnode = [\"subscribe:user\"]\n",
            &format!("node {}\n", token_hash("n")),
        );
        let p = auth.authenticate(&bearer("n"), None).unwrap();
        assert!(auth.check_subscribe(&p, &[], false).is_err());
        assert!(auth.check_subscribe(&p, &["price".into()], false).is_err());
        assert!(auth.check_subscribe(&p, &[], true).is_err());
        let mut access = auth.check_subscribe(&p, &["user".into()], false).unwrap();
        assert!(access.recheck().is_ok());
        std::fs::write(dir.path().join("policy.toml"), "[principals]\n").unwrap();
        auth.reload();
        let e = access.recheck().unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        // A broken file keeps the last good state.
        std::fs::write(dir.path().join("policy.toml"), "[principals\n").unwrap();
        let before = auth.generation();
        auth.reload();
        assert_eq!(auth.generation(), before);
    }
}
