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

    /// A 2048-bit RSA key made for this test only (PKCS#1 DER, hex) and its
    /// modulus: RS256 verifies, and the claims are checked after it.
    const RSA_DER_HEX: &str = concat!(
        "308204a202010002820101009a38a4f13ce16f0fc9a0edb61b87f4c595a1a24e7580e52cf2a70f6fa4d14a0c",
        "d08c042081fb25246d1d7a8f480346133ce27cf5ec35cc371e42f6b4e0810e6933a9702dc6cbbfdd84b8c903",
        "fed4c89cdf7a5f7598c31ea37a1f010dca07e2258109c8be61d2d8ca82447dfe999d47df53660429e2d15c7e",
        "1f468d88bd2d42e52cdb5567ecb52a75ddd5d8adc552ef612a1ca16aa2f10beedef281b022197c32f5e40dab",
        "e718437d54c72d9ad8985987aef359f2474694599a311cc6f3b376b1cb629871a640021456974a9433a391c5",
        "203cc2640fb27e857b13aa5caadb5c4a5601c5527b9705360a6dbfde2f1095842a3460dedc858cd7be2b4c81",
        "a5de61ff0203010001028201001bbb7de5a785fe5bbf6d41f1d267935b8879c55f08804235dff8acaceddd78",
        "cc6f200e89edf5c48b15580cb701431d71ce2c083e8cd86bbda9a26f0cbda6577a1181319bf9b89feaecb7f1",
        "e5d7085a7ee32cf547874de70f8ca150a6332351c65ebaecaf5795fbc806bedc4d514058314fa4f3b0b889df",
        "710a9cbc4ccf7ff91c478989a5d267517de83ffdaf72c5965c37c242c75c702718732076e8610e8f27d9ca2f",
        "ea0f1609f14859d4e7db1ccd27ab81f36e142507cd86bc3bce18651edfd514faaaa5b479c7bc42bd0f017867",
        "5e6ed129a03b3f6666e640deaea3bfb0f9879ee2e326e69ea151daf76216d903583e5e6d8cd2e4d0268a285a",
        "88cd1eea1902818100c9b056d9829ad871ebdd154e0a8a6cc4d6272d1c7cb1b46a2afb07b7c11f65c86df1de",
        "486ae882c45ea83e9bce063feb72cd052e3c97d0ec12a351ba6ce0c1a3f21d0f700353545d5995d99043ea6c",
        "e1cdcf75fbed2ee419632749e2ef7322173b54f9315ead93a48920160676e8d4e7e8a7b3586f27d74a12386d",
        "8acd98f2fd02818100c3c0127242cdc02feace35cc76718233c0ccccbef32516e7093ac0180d1069e89c1a8d",
        "4fbd43de04eb3121a8f45b22e0259c27ccacc08897556c6a65f43689c31a39e02a508cce77c0cd5d99da940b",
        "a662e13343e78610c2940d06f7b69ef95ff2c2fc9cfab9c04ac9a7a79aa16e695dfbd95c30c400ddbb7fe042",
        "ed8e184fab0281806f224bb8eece8415c1f1c09b9013567bdfc516866bef3f8a80c4722c3eae1e57a2bd73ce",
        "539a6af3e974ab8b0eab42ed6a04aea61b9d4bf1c91355257479243a425ee0f2c7e252ca5d62c4cf499d1302",
        "1976077d19e48cabb087259f7671ea87029a7ff5444640e498eaa5384aad6123a87f3fc3aafc391507953047",
        "1ba2fbc10281807935c4f655a15be10fef3266f1eca567f079a04a98fa9d6ce04d2dc776c7741d22145aee46",
        "4ef0fa70bc1290b10681d8f3d0f6e009148b3fd21878e5bacbce902dfc2a6f69435751d5e4149281436cd751",
        "a10b02802986d545a1af6fd1f82c889a24dd11433ba3f36b5cd22eb0c9529b6ca8922a6c23f128fa2cdea484",
        "794f530281802f2d21cfea72c29d23e9d060114518eebc9624713f3801c551a732b3cf45af92a3be7e1e45a7",
        "fbf43720ad0fbd355a3ca09df671a050e5997020e4cbf8f4e2b760c92d3457c3b126061f6776fc604a472ce4",
        "5ba824e97839393808112eface455866b1dd8b92c313c8c4b0bba0bf0ff28a8d33c85fdce3eadf3652ea9a79",
        "1404",
    );
    const RSA_N: &str = concat!(
        "mjik8Tzhbw_JoO22G4f0xZWhok51gOUs8qcPb6TRSgzQjAQggfslJG0deo9IA0YTPOJ89ew1zDceQva04IEOaTOp",
        "cC3Gy7_dhLjJA_7UyJzfel91mMMeo3ofAQ3KB-IlgQnIvmHS2MqCRH3-mZ1H31NmBCni0Vx-H0aNiL0tQuUs21Vn",
        "7LUqdd3V2K3FUu9hKhyhaqLxC-7e8oGwIhl8MvXkDavnGEN9VMctmtiYWYeu81nyR0aUWZoxHMbzs3axy2KYcaZA",
        "AhRWl0qUM6ORxSA8wmQPsn6FexOqXKrbXEpWAcVSe5cFNgptv94vEJWEKjRg3tyFjNe-K0yBpd5h_w",
    );

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn rs256_tokens_verify_and_their_claims_are_checked() {
        let jwks = format!(
            r#"{{"keys":[{{"kty":"RSA","n":"{RSA_N}","e":"AQAB","kid":"r","alg":"RS256"}}]}}"#
        );
        let jwks = Jwks::parse(&jwks, &["freshness".to_owned()]).unwrap();
        let key = jsonwebtoken::EncodingKey::from_rsa_der(&unhex(RSA_DER_HEX));
        let mut header = jsonwebtoken::Header::new(Algorithm::RS256);
        header.kid = Some("r".into());
        let now = jsonwebtoken::get_current_timestamp();
        let sign = |aud: &str, exp: u64| {
            let claims = serde_json::json!({"sub": "job", "aud": aud, "exp": exp, "permissions": ["status"]});
            jsonwebtoken::encode(&header, &claims, &key).unwrap()
        };
        let ok = jwks.verify(&sign("freshness", now + 600)).unwrap();
        assert_eq!(ok.subject, "job");
        assert_eq!(ok.permissions, ["status"]);
        assert_eq!(
            jwks.verify(&sign("freshness", now - 3600)).unwrap_err(),
            Rejected::Expired
        );
        assert_eq!(
            jwks.verify(&sign("other", now + 600)).unwrap_err(),
            Rejected::WrongAudience
        );
        // A character inside the signature: the last one may carry only
        // padding bits, which decoders ignore.
        let mut forged = sign("freshness", now + 600).into_bytes();
        let at = forged.iter().rposition(|&b| b == b'.').unwrap() + 5;
        forged[at] = if forged[at] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).unwrap();
        assert_eq!(jwks.verify(&forged).unwrap_err(), Rejected::BadSignature);
        assert_eq!(jwks.verify("not.a.jwt").unwrap_err(), Rejected::Malformed);
    }
}
