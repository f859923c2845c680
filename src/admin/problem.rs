//! RFC 9457 problem details, and the request extractors that produce them: every error of the
//! admin API is `application/problem+json` and names the field at fault where there is one.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use utoipa::ToSchema;

use crate::policy::SpecError;
use crate::store::StoreError;

/// An RFC 9457 problem document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem, e.g. `urn:tokenbudget:problem:validation`.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// The fields at fault (validation problems).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct FieldError {
    /// The field's path in the request: `limit_usd`, `models[2]`, or a query parameter name.
    pub field: String,
    pub message: String,
}

impl Problem {
    fn new(status: StatusCode, kind: &str, detail: impl Into<String>) -> Problem {
        Problem {
            kind: format!("urn:tokenbudget:problem:{kind}"),
            title: status.canonical_reason().unwrap_or("Error").to_string(),
            status: status.as_u16(),
            detail: detail.into(),
            errors: Vec::new(),
        }
    }

    /// A request that is well-formed but invalid (422), naming the field.
    pub fn invalid(field: &str, message: impl Into<String>) -> Problem {
        let message = message.into();
        let mut p = Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            format!("{field}: {message}"),
        );
        p.errors.push(FieldError {
            field: field.to_string(),
            message,
        });
        p
    }

    /// A request that cannot be read (400): bad JSON, wrong types, unknown fields.
    pub fn malformed(field: Option<&str>, message: impl Into<String>) -> Problem {
        let message = message.into();
        let mut p = Problem::new(StatusCode::BAD_REQUEST, "malformed", message.clone());
        if let Some(f) = field.filter(|f| !f.is_empty() && *f != ".") {
            p.detail = format!("{f}: {message}");
            p.errors.push(FieldError {
                field: f.to_string(),
                message,
            });
        }
        p
    }

    pub fn not_found(what: impl Into<String>) -> Problem {
        Problem::new(StatusCode::NOT_FOUND, "not-found", what)
    }

    pub fn conflict(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::CONFLICT, "conflict", detail)
    }

    pub fn unauthorized() -> Problem {
        Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send an admin API token: Authorization: Bearer <token>",
        )
    }

    pub fn forbidden(who: &str) -> Problem {
        Problem::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("token {who:?} has the viewer role: it may read, not change"),
        )
    }

    pub fn unavailable(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::SERVICE_UNAVAILABLE, "store-unavailable", detail)
    }

    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self).unwrap_or_default();
        (
            self.status(),
            [(header::CONTENT_TYPE, "application/problem+json")],
            body,
        )
            .into_response()
    }
}

impl From<StoreError> for Problem {
    fn from(e: StoreError) -> Problem {
        match e {
            StoreError::NotFound(what) => Problem::not_found(format!("no {what}")),
            StoreError::Conflict(msg) => Problem::conflict(msg),
            StoreError::Unavailable(msg) => {
                tracing::warn!(error = %msg, "admin API: store unavailable");
                Problem::unavailable("the store is unavailable; try again")
            }
            StoreError::Corrupt(msg) => {
                tracing::error!(error = %msg, "admin API: stored data is invalid");
                Problem::unavailable("stored data is invalid; see the server log")
            }
        }
    }
}

impl From<SpecError> for Problem {
    fn from(e: SpecError) -> Problem {
        Problem::invalid(e.field, e.message)
    }
}

/// A JSON body, deserialized with the path of the field at fault in any error.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Problem> {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                let mime = v.split(';').next().unwrap_or("").trim();
                mime.eq_ignore_ascii_case("application/json")
                    || mime.to_ascii_lowercase().ends_with("+json")
            });
        if !json {
            return Err(Problem::malformed(
                None,
                "expected a JSON body (content-type: application/json)",
            ));
        }
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| Problem::malformed(None, e.body_text()))?;
        let de = &mut serde_json::Deserializer::from_slice(&bytes);
        serde_path_to_error::deserialize(de)
            .map(ApiJson)
            .map_err(|e| {
                let field = e.path().to_string();
                Problem::malformed(Some(&field), e.into_inner().to_string())
            })
    }
}

/// Query parameters, deserialized with the parameter at fault in any error.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Problem> {
        let query = parts.uri.query().unwrap_or("");
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de)
            .map(ApiQuery)
            .map_err(|e| {
                let field = e.path().to_string();
                Problem::malformed(Some(&field), e.into_inner().to_string())
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_problems_name_the_field() {
        let p = Problem::invalid("limit_usd", "not a number");
        assert_eq!(p.status, 422);
        assert_eq!(p.errors[0].field, "limit_usd");
        assert_eq!(p.detail, "limit_usd: not a number");
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["type"], "urn:tokenbudget:problem:validation");
        assert!(
            serde_json::to_value(Problem::not_found("x")).unwrap()["errors"].is_null(),
            "no empty errors list"
        );
    }
}
