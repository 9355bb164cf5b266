//! Bearer credentials: JWTs verified against a JWKS file, and a static
//! token file holding SHA-256 hashes of tokens.

use std::collections::HashMap;
use std::path::Path;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Why a bearer token was refused (a metric label and the words of the
/// `UNAUTHENTICATED` answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// `exp` is past.
    Expired,
    /// `nbf` is in the future.
    NotYetValid,
    /// The signature does not verify, or no key of the JWKS fits.
    BadSignature,
    /// `aud` is not this hub's audience.
    WrongAudience,
    /// Not a JWT this hub can read (or a claim is missing).
    Malformed,
    /// A static token that is not in the token file.
    UnknownToken,
}

impl Rejected {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Expired => "token_expired",
            Self::NotYetValid => "token_not_yet_valid",
            Self::BadSignature => "token_bad_signature",
            Self::WrongAudience => "token_wrong_audience",
            Self::Malformed => "token_malformed",
            Self::UnknownToken => "token_unknown",
        }
    }

    /// The answer's words.
    pub fn message(self) -> &'static str {
        match self {
            Self::Expired => "the token has expired",
            Self::NotYetValid => "the token is not valid yet (nbf)",
            Self::BadSignature => "the token's signature does not verify against the hub's keys",
            Self::WrongAudience => "the token is for another audience",
            Self::Malformed => "the token is not a JWT with sub, exp and aud",
            Self::UnknownToken => "unknown token",
        }
    }
}

/// The claims the hub reads.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    /// Permissions carried by the token, as in the policy file.
    #[serde(default)]
    permissions: Vec<String>,
}

/// A verified JWT: its subject and the permissions it carries.
#[derive(Debug, Clone)]
pub struct VerifiedJwt {
    /// `sub`.
    pub subject: String,
    /// `permissions`, unparsed.
    pub permissions: Vec<String>,
}

/// The keys of a JWKS file, each with the one algorithm it verifies.
pub struct Jwks {
    keys: Vec<(Option<String>, Algorithm, DecodingKey)>,
    audience: Vec<String>,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks")
            .field("keys", &self.keys.len())
            .field("audience", &self.audience)
            .finish()
    }
}

/// The algorithm a key verifies: its `alg` when given, else the one its
/// type implies. RS256, ES256 and EdDSA only.
fn key_algorithm(jwk: &Jwk) -> Result<Algorithm, String> {
    use jsonwebtoken::jwk::KeyAlgorithm as K;
    let implied = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        _ => return Err("only RSA, EC P-256 and Ed25519 keys are accepted".into()),
    };
    match jwk.common.key_algorithm {
        None => Ok(implied),
        Some(K::RS256) if implied == Algorithm::RS256 => Ok(implied),
        Some(K::ES256) if implied == Algorithm::ES256 => Ok(implied),
        Some(K::EdDSA) if implied == Algorithm::EdDSA => Ok(implied),
        Some(other) => Err(format!(
            "alg {other:?} is not accepted for this key (RS256, ES256, EdDSA)"
        )),
    }
}

impl Jwks {
    /// Reads a JWKS file (`{"keys": [...]}`); `audience` is what `aud`
    /// must hold.
    pub fn load(path: &Path, audience: &[String]) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read JWKS file {}: {e}", path.display()))?;
        Self::parse(&text, audience).map_err(|e| format!("JWKS file {}: {e}", path.display()))
    }

    /// Parses JWKS text.
    pub fn parse(text: &str, audience: &[String]) -> Result<Self, String> {
        let set: JwkSet = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let mut keys = Vec::with_capacity(set.keys.len());
        for (i, jwk) in set.keys.iter().enumerate() {
            let alg = key_algorithm(jwk).map_err(|e| format!("key {i}: {e}"))?;
            let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {i}: {e}"))?;
            keys.push((jwk.common.key_id.clone(), alg, key));
        }
        Ok(Self {
            keys,
            audience: audience.to_vec(),
        })
    }

    /// Verifies `token`: signature by a key of the set (the one its `kid`
    /// names, else each key of its algorithm), `exp`, `nbf` and `aud`.
    pub fn verify(&self, token: &str) -> Result<VerifiedJwt, Rejected> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| Rejected::Malformed)?;
        if !matches!(
            header.alg,
            Algorithm::RS256 | Algorithm::ES256 | Algorithm::EdDSA
        ) {
            return Err(Rejected::BadSignature);
        }
        let mut validation = Validation::new(header.alg);
        validation.leeway = 30;
        validation.validate_nbf = true;
        validation.set_audience(&self.audience);
        validation.set_required_spec_claims(&["exp", "sub", "aud"]);
        let mut last = Rejected::BadSignature;
        let candidates = self.keys.iter().filter(|(kid, alg, _)| {
            *alg == header.alg
                && match (&header.kid, kid) {
                    (Some(want), Some(have)) => want == have,
                    _ => true,
                }
        });
        for (_, _, key) in candidates {
            use jsonwebtoken::errors::ErrorKind as E;
            match jsonwebtoken::decode::<Claims>(token, key, &validation) {
                Ok(data) => {
                    return Ok(VerifiedJwt {
                        subject: data.claims.sub,
                        permissions: data.claims.permissions,
                    });
                }
                Err(e) => {
                    last = match e.kind() {
                        E::InvalidSignature => Rejected::BadSignature,
                        // The signature verified; the claims decide.
                        E::ExpiredSignature => return Err(Rejected::Expired),
                        E::ImmatureSignature => return Err(Rejected::NotYetValid),
                        E::InvalidAudience => return Err(Rejected::WrongAudience),
                        E::MissingRequiredClaim(_) | E::Json(_) => {
                            return Err(Rejected::Malformed);
                        }
                        _ => Rejected::BadSignature,
                    }
                }
            }
        }
        Err(last)
    }
}

/// The static token file: one `NAME SHA256-HEX` per line (`#` comments),
/// the hash of the token (`printf %s "$TOKEN" | sha256sum`).
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    by_hash: HashMap<[u8; 32], String>,
}

impl Tokens {
    /// Reads a token file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read token file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("token file {}: {e}", path.display()))
    }

    /// Parses token file text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut by_hash = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = || {
                format!(
                    "line {}: expected NAME and the token's SHA-256 in hex (64 characters)",
                    i + 1
                )
            };
            let mut parts = line.split_whitespace();
            let (Some(name), Some(hex), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(bad());
            };
            let hash = parse_hex32(hex).ok_or_else(bad)?;
            by_hash.insert(hash, name.to_owned());
        }
        Ok(Self { by_hash })
    }

    /// The name of the token, if the file holds its hash.
    pub fn lookup(&self, token: &str) -> Option<&str> {
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.by_hash.get(&hash).map(String::as_str)
    }
}

/// Lower-case hex of `token`'s SHA-256 (what the token file holds).
pub fn token_hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_holds_hashes_not_tokens() {
        let file = format!("# writers\nwriter {}\n\n", token_hash("s3cret"));
        let t = Tokens::parse(&file).unwrap();
        assert_eq!(t.lookup("s3cret"), Some("writer"));
        assert_eq!(t.lookup("s3cre"), None);
        assert!(
            Tokens::parse("writer s3cret\n")
                .unwrap_err()
                .starts_with("line 1:")
        );
        assert!(Tokens::parse("writer\n").is_err());
    }
}
