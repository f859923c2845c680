//! Who is calling: the principal and its groups, from sources Envoy vouches for, tried in the
//! configured order.
//!
//! - `header`: a trusted header (default `x-tokenbudget-principal`, groups in
//!   `x-tokenbudget-groups`, comma-separated). Trusted only because the shipped Envoy configs remove
//!   these headers from every downstream request before an auth filter may set them.
//! - `jwt`: the `jwt_authn` filter's verified payload in dynamic metadata
//!   (`payload_in_metadata`), with configurable claim names.
//!
//! The request body is never a source of identity.

use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};

use crate::policy::{Principal, PrincipalKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Header,
    Jwt,
}

#[derive(Debug, Clone)]
pub struct IdentityConfig {
    pub sources: Vec<Source>,
    pub principal_header: String,
    pub groups_header: String,
    /// Header saying the principal is a `service_principal` (default: a user).
    pub kind_header: String,
    /// Dynamic-metadata namespace of the jwt_authn filter.
    pub jwt_namespace: String,
    /// The jwt_authn `payload_in_metadata` key.
    pub jwt_payload_key: String,
    /// Claims tried in order for the principal id.
    pub jwt_principal_claims: Vec<String>,
    pub jwt_groups_claim: String,
    /// Claims that, when present, make the caller a service principal whose stable id is the
    /// claim's value (e.g. `client_id`, `azp`); tried before `jwt_principal_claims`.
    pub jwt_service_principal_claims: Vec<String>,
    /// When set, callers with no identity are this user instead of being refused.
    pub anonymous: Option<String>,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            sources: vec![Source::Header, Source::Jwt],
            principal_header: "x-tokenbudget-principal".into(),
            groups_header: "x-tokenbudget-groups".into(),
            kind_header: "x-tokenbudget-principal-kind".into(),
            jwt_namespace: "envoy.filters.http.jwt_authn".into(),
            jwt_payload_key: "jwt_payload".into(),
            jwt_principal_claims: vec!["email".into(), "sub".into()],
            jwt_groups_claim: "groups".into(),
            jwt_service_principal_claims: Vec::new(),
            anonymous: None,
        }
    }
}

/// What identity resolution reads from one request.
pub struct Evidence<'a> {
    pub header: &'a dyn Fn(&str) -> Option<&'a str>,
    /// `metadata_context.filter_metadata`, when Envoy forwarded any.
    pub metadata: Option<&'a std::collections::HashMap<String, Struct>>,
}

impl IdentityConfig {
    pub fn resolve(&self, ev: &Evidence<'_>) -> Option<Principal> {
        for source in &self.sources {
            let found = match source {
                Source::Header => self.read_header(ev),
                Source::Jwt => self.read_jwt(ev),
            };
            if found.is_some() {
                return found;
            }
        }
        self.anonymous.as_ref().map(Principal::user)
    }

    fn read_header(&self, ev: &Evidence<'_>) -> Option<Principal> {
        let id = (ev.header)(&self.principal_header)?.trim();
        if id.is_empty() {
            return None;
        }
        let kind = match (ev.header)(&self.kind_header).map(str::trim) {
            Some("service_principal") => PrincipalKind::ServicePrincipal,
            _ => PrincipalKind::User,
        };
        let groups = (ev.header)(&self.groups_header)
            .map(split_groups)
            .unwrap_or_default();
        Some(Principal {
            kind,
            id: id.to_owned(),
            groups,
        })
    }

    fn read_jwt(&self, ev: &Evidence<'_>) -> Option<Principal> {
        let payload = match ev
            .metadata?
            .get(&self.jwt_namespace)?
            .fields
            .get(&self.jwt_payload_key)?
            .kind
            .as_ref()?
        {
            Kind::StructValue(s) => s,
            _ => return None,
        };
        let string_claim = |c: &String| match claim(payload, c)? {
            Kind::StringValue(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
            _ => None,
        };
        let (kind, id) = match self
            .jwt_service_principal_claims
            .iter()
            .find_map(string_claim)
        {
            Some(id) => (PrincipalKind::ServicePrincipal, id),
            None => (
                PrincipalKind::User,
                self.jwt_principal_claims.iter().find_map(string_claim)?,
            ),
        };
        let groups = match claim(payload, &self.jwt_groups_claim) {
            Some(Kind::ListValue(l)) => l
                .values
                .iter()
                .filter_map(|v| match &v.kind {
                    Some(Kind::StringValue(s)) if !s.is_empty() => Some(s.clone()),
                    _ => None,
                })
                .collect(),
            Some(Kind::StringValue(s)) => split_groups(s),
            _ => Vec::new(),
        };
        Some(Principal { kind, id, groups })
    }
}

fn claim<'a>(payload: &'a Struct, name: &str) -> Option<&'a Kind> {
    payload
        .fields
        .get(name)
        .and_then(|v: &Value| v.kind.as_ref())
}

fn split_groups(s: &str) -> Vec<String> {
    s.split([',', ' '])
        .map(str::trim)
        .filter(|g| !g.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use envoy_types::pb::google::protobuf::ListValue;

    use super::*;

    fn s(v: &str) -> Value {
        Value {
            kind: Some(Kind::StringValue(v.into())),
        }
    }

    fn jwt(claims: Vec<(&str, Value)>) -> HashMap<String, Struct> {
        let payload = Struct {
            fields: claims
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        };
        let ns = Struct {
            fields: HashMap::from([(
                "jwt_payload".to_string(),
                Value {
                    kind: Some(Kind::StructValue(payload)),
                },
            )]),
        };
        HashMap::from([("envoy.filters.http.jwt_authn".to_string(), ns)])
    }

    fn resolve(
        cfg: &IdentityConfig,
        headers: &[(&str, &str)],
        md: Option<&HashMap<String, Struct>>,
    ) -> Option<Principal> {
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        cfg.resolve(&Evidence {
            header: &lookup,
            metadata: md,
        })
    }

    #[test]
    fn header_source_reads_principal_kind_and_groups() {
        let cfg = IdentityConfig::default();
        let p = resolve(
            &cfg,
            &[
                ("x-tokenbudget-principal", "alice@example.com"),
                ("x-tokenbudget-groups", "ml, eng,,"),
            ],
            None,
        )
        .unwrap();
        assert_eq!(
            p,
            Principal::user("alice@example.com").with_groups(["ml", "eng"])
        );
        let sp = resolve(
            &cfg,
            &[
                ("x-tokenbudget-principal", "app-1"),
                ("x-tokenbudget-principal-kind", "service_principal"),
            ],
            None,
        )
        .unwrap();
        assert_eq!(sp.kind, PrincipalKind::ServicePrincipal);
    }

    #[test]
    fn jwt_source_uses_the_first_present_claim() {
        let cfg = IdentityConfig::default();
        let groups = Value {
            kind: Some(Kind::ListValue(ListValue {
                values: vec![s("ml"), s("ops")],
            })),
        };
        let md = jwt(vec![
            ("sub", s("u-1")),
            ("email", s("bob@example.com")),
            ("groups", groups),
        ]);
        let p = resolve(&cfg, &[], Some(&md)).unwrap();
        assert_eq!(
            p,
            Principal::user("bob@example.com").with_groups(["ml", "ops"])
        );
        let md = jwt(vec![("sub", s("u-1")), ("groups", s("a b"))]);
        assert_eq!(
            resolve(&cfg, &[], Some(&md)).unwrap(),
            Principal::user("u-1").with_groups(["a", "b"])
        );
    }

    #[test]
    fn sources_follow_the_configured_order_and_anonymous_is_opt_in() {
        let md = jwt(vec![("sub", s("from-jwt"))]);
        let hdr = [("x-tokenbudget-principal", "from-header")];
        let mut cfg = IdentityConfig::default();
        assert_eq!(resolve(&cfg, &hdr, Some(&md)).unwrap().id, "from-header");
        cfg.sources = vec![Source::Jwt, Source::Header];
        assert_eq!(resolve(&cfg, &hdr, Some(&md)).unwrap().id, "from-jwt");
        cfg.sources = vec![Source::Jwt];
        assert_eq!(resolve(&cfg, &hdr, None), None);
        assert_eq!(
            resolve(&cfg, &[("x-tokenbudget-principal", " ")], None),
            None
        );
        cfg.anonymous = Some("anonymous".into());
        assert_eq!(resolve(&cfg, &[], None).unwrap().id, "anonymous");
    }
}
