//! Bearer-token authentication of the admin API.
//!
//! Tokens are configured as SHA-256 hashes (`[[admin.tokens]]`), never in clear: a leaked config
//! file does not leak a credential. Tokens are long random strings (`tokenbudget token new`), so a
//! plain hash suffices — there is nothing to brute-force that a slow hash would protect.
//!
//! **Invariant:** every `/api/v1` route except the OpenAPI document passes [`require`]; writes need
//! [`Role::Admin`]. With no tokens configured the API refuses every request.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::problem::Problem;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads and writes.
    Admin,
    /// Reads only.
    Viewer,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "viewer" => Some(Role::Viewer),
            _ => None,
        }
    }
}

/// One configured token: its name (recorded as the actor in the audit log), role and hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminToken {
    pub name: String,
    pub role: Role,
    pub sha256: [u8; 32],
}

/// The caller of an authenticated request, put in the request's extensions by [`require`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

pub fn sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Parses a hex SHA-256 digest as written in the config file.
pub fn parse_digest(hex_digest: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_digest.trim(), &mut out).ok()?;
    Some(out)
}

/// A new random token (244 random bits) and its hex digest for the config file.
pub fn new_token() -> (String, String) {
    let token = format!(
        "tb_{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let digest = hex::encode(sha256(&token));
    (token, digest)
}

/// Equality that takes the same time wherever the inputs differ.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The configured token matching the presented one, if any. Every configured hash is compared.
pub fn authenticate(tokens: &[AdminToken], presented: &str) -> Option<Caller> {
    let digest = sha256(presented);
    let mut found = None;
    for t in tokens {
        if constant_time_eq(&t.sha256, &digest) {
            found = Some(Caller {
                name: t.name.clone(),
                role: t.role,
            });
        }
    }
    found
}

fn bearer(req: &Request) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Middleware: 401 without a valid token, 403 when a viewer calls anything but a read.
pub async fn require(
    State(tokens): State<Arc<[AdminToken]>>,
    mut req: Request,
    next: Next,
) -> Response {
    let Some(caller) = bearer(&req).and_then(|t| authenticate(&tokens, t)) else {
        let mut resp = Problem::unauthorized().into_response();
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"tokenbudget\""),
        );
        return resp;
    };
    // The dry-run check is a POST that changes nothing: viewers may use it.
    let read = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS)
        || (req.method() == Method::POST && req.uri().path().ends_with("/check"));
    if !read && caller.role != Role::Admin {
        return Problem::forbidden(&caller.name).into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_matches_only_its_own_hash() {
        let (token, digest) = new_token();
        let tokens = vec![
            AdminToken {
                name: "other".into(),
                role: Role::Admin,
                sha256: sha256("something else"),
            },
            AdminToken {
                name: "ops".into(),
                role: Role::Viewer,
                sha256: parse_digest(&digest).unwrap(),
            },
        ];
        assert_eq!(
            authenticate(&tokens, &token),
            Some(Caller {
                name: "ops".into(),
                role: Role::Viewer
            })
        );
        assert_eq!(authenticate(&tokens, &digest), None);
        assert_eq!(authenticate(&tokens, ""), None);
        assert_eq!(authenticate(&tokens, &token[..token.len() - 1]), None);
        assert_ne!(new_token().0, token);
    }

    #[test]
    fn digests_must_be_64_hex_digits() {
        assert!(parse_digest(&"ab".repeat(32)).is_some());
        assert!(parse_digest("abc").is_none());
        assert!(parse_digest(&"zz".repeat(32)).is_none());
    }
}
