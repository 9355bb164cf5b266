//! Permissions and the policy file that grants them to principals.
//!
//! A permission is `publish:<namespace glob>`, `subscribe:<namespace glob>`,
//! `status` or `replicate`. A glob is a namespace where `*` stands for any
//! run of characters (`*` alone: every namespace). The policy file, TOML or
//! YAML by its extension, maps principal names to their permissions:
//!
//! ```toml
//! [principals]
//! "spiffe://example.org/writer" = ["publish:user", "publish:price*"]
//! "node-eu-1.example.org" = ["subscribe:*"]
//! "*" = ["status"]   # every authenticated principal
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

/// One right.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Permission {
    /// Publish events whose namespace matches the glob.
    Publish(Glob),
    /// Subscribe to namespaces matching the glob.
    Subscribe(Glob),
    /// Read the hub's status.
    Status,
    /// Replicate from this hub (a peer region's hub).
    Replicate,
}

impl std::str::FromStr for Permission {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        match s {
            "status" => return Ok(Self::Status),
            "replicate" => return Ok(Self::Replicate),
            _ => {}
        }
        let (kind, glob) = s.split_once(':').ok_or_else(|| {
            format!("{s:?} is not a permission (publish:<ns>, subscribe:<ns>, status, replicate)")
        })?;
        let glob = Glob::new(glob)?;
        match kind {
            "publish" => Ok(Self::Publish(glob)),
            "subscribe" => Ok(Self::Subscribe(glob)),
            _ => Err(format!(
                "{s:?} is not a permission (publish:<ns>, subscribe:<ns>, status, replicate)"
            )),
        }
    }
}

/// A namespace pattern: namespace characters and `*` (any run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    /// Checks the characters: a namespace's, and `*`.
    pub fn new(s: &str) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= 63
            && s.bytes().all(|c| {
                c.is_ascii_lowercase()
                    || c.is_ascii_digit()
                    || matches!(c, b'_' | b'.' | b'-' | b'*')
            });
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(format!(
                "{s:?} is not a namespace glob (lower-case letters, digits, _ . - and *)"
            ))
        }
    }

    /// `*` alone: every namespace.
    pub fn is_all(&self) -> bool {
        self.0 == "*"
    }

    /// Whether `ns` matches.
    pub fn matches(&self, ns: &str) -> bool {
        glob_match(self.0.as_bytes(), ns.as_bytes())
    }
}

impl std::fmt::Display for Glob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `*` matches any run; everything else itself. Iterative, with one
/// backtrack point (the last `*`), so linear-ish and never recursive.
fn glob_match(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if pi < p.len() && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// A principal's permissions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants(pub Vec<Permission>);

impl Grants {
    /// Every permission (a hub without authentication).
    pub fn all() -> Self {
        let all = Glob("*".into());
        Self(vec![
            Permission::Publish(all.clone()),
            Permission::Subscribe(all),
            Permission::Status,
            Permission::Replicate,
        ])
    }

    /// Parses permission strings; the error names the bad one.
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<Self, String> {
        items
            .iter()
            .map(|s| s.as_ref().parse())
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    /// Adds `other`'s permissions.
    pub fn extend(&mut self, other: &Grants) {
        self.0.extend(other.0.iter().cloned());
    }

    /// May publish into `ns`.
    pub fn may_publish(&self, ns: &str) -> bool {
        self.0
            .iter()
            .any(|p| matches!(p, Permission::Publish(g) if g.matches(ns)))
    }

    /// May subscribe to `ns`; `None` is every namespace, which needs
    /// `subscribe:*`.
    pub fn may_subscribe(&self, ns: Option<&str>) -> bool {
        self.0.iter().any(|p| match (p, ns) {
            (Permission::Subscribe(g), Some(ns)) => g.matches(ns),
            (Permission::Subscribe(g), None) => g.is_all(),
            _ => false,
        })
    }

    /// May read status; `replicate` includes it (a link reads its peer's
    /// heads for its lag).
    pub fn may_status(&self) -> bool {
        self.0
            .iter()
            .any(|p| matches!(p, Permission::Status | Permission::Replicate))
    }

    /// May replicate.
    pub fn may_replicate(&self) -> bool {
        self.0.contains(&Permission::Replicate)
    }
}

/// The policy file: principal name → permissions; `*` applies to every
/// authenticated principal.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    principals: BTreeMap<String, Grants>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    principals: BTreeMap<String, Vec<String>>,
}

impl Policy {
    /// Reads a policy file: YAML when it ends in `.yaml`/`.yml`, else TOML.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read policy file {}: {e}", path.display()))?;
        let yaml = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
        Self::parse(&text, yaml).map_err(|e| format!("policy file {}: {e}", path.display()))
    }

    /// Parses a policy from TOML or YAML text.
    pub fn parse(text: &str, yaml: bool) -> Result<Self, String> {
        let file: PolicyFile = if yaml {
            serde_yaml::from_str(text).map_err(|e| e.to_string().replace('\n', " "))?
        } else {
            toml::from_str(text).map_err(|e| e.message().replace('\n', " "))?
        };
        let mut principals = BTreeMap::new();
        for (name, items) in file.principals {
            let grants = Grants::parse(&items).map_err(|e| format!("principal {name:?}: {e}"))?;
            principals.insert(name, grants);
        }
        Ok(Self { principals })
    }

    /// What `name` is granted: its own entry and `*`'s.
    pub fn grants(&self, name: &str) -> Grants {
        let mut g = Grants::default();
        if let Some(own) = self.principals.get(name) {
            g.extend(own);
        }
        if let Some(every) = self.principals.get("*") {
            g.extend(every);
        }
        g
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_namespaces() {
        let g = |p: &str, s: &str| Glob::new(p).unwrap().matches(s);
        assert!(g("*", "user"));
        assert!(g("user", "user"));
        assert!(!g("user", "users"));
        assert!(g("user*", "users"));
        assert!(g("*-eu", "price-eu"));
        assert!(!g("*-eu", "price-us"));
        assert!(g("a*b*c", "axxbyyc"));
        assert!(!g("a*b*c", "axxbyy"));
        assert!(Glob::new("User").is_err());
        assert!(Glob::new("").is_err());
    }

    #[test]
    fn permissions_parse_and_name_the_bad_entry() {
        let g = Grants::parse(&["publish:user", "subscribe:*", "status"]).unwrap();
        assert!(g.may_publish("user"));
        assert!(!g.may_publish("price"));
        assert!(g.may_subscribe(None));
        assert!(g.may_status());
        assert!(!g.may_replicate());
        let narrow = Grants::parse(&["subscribe:user*"]).unwrap();
        assert!(narrow.may_subscribe(Some("user")));
        assert!(!narrow.may_subscribe(None));
        let e = Grants::parse(&["publish:user", "delete:user"]).unwrap_err();
        assert!(e.contains("\"delete:user\""), "{e}");
    }

    #[test]
    fn policy_reads_toml_and_yaml_alike() {
        let toml =
            "[principals]\n\"spiffe://x/writer\" = [\"publish:user\"]\n\"*\" = [\"status\"]\n";
        let yaml = "principals:\n  spiffe://x/writer: [\"publish:user\"]\n  \"*\": [status]\n";
        let a = Policy::parse(toml, false).unwrap();
        let b = Policy::parse(yaml, true).unwrap();
        assert_eq!(a, b);
        let w = a.grants("spiffe://x/writer");
        assert!(w.may_publish("user") && w.may_status());
        let other = a.grants("someone");
        assert!(!other.may_publish("user") && other.may_status());
        let e = Policy::parse("[principals]\nn = [\"publish:\"]\n", false).unwrap_err();
        assert!(e.starts_with("principal \"n\""), "{e}");
        assert!(Policy::parse("[principal]\n", false).is_err());
    }

    #[test]
    fn the_policy_the_helm_chart_renders_parses() {
        // helm/freshness-hub: `dict "principals" .Values.auth.policy | toYaml`.
        let rendered = "principals:\n  node:\n  - subscribe:*\n  spiffe://example.org/hub/us:\n  - replicate\n  writer:\n  - publish:*\n";
        let p = Policy::parse(rendered, true).unwrap();
        assert!(p.grants("node").may_subscribe(None));
        assert!(p.grants("spiffe://example.org/hub/us").may_replicate());
        assert!(p.grants("writer").may_publish("price"));
    }
}
