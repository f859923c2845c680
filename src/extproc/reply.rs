//! Every message we send to Envoy is built here: pass-through replies, header mutations, mode
//! overrides, and the local replies (429 budget exhausted, 403 unpriced model, 401 no identity) in
//! each API family's own error shape. Errors become wire responses in this one place.
//!
//! Header values always go in `raw_value` only, with `append_action = OVERWRITE_IF_EXISTS_OR_ADD`.

use chrono::{DateTime, SecondsFormat, Utc};
use envoy_types::pb::envoy::config::core::v3::{
    HeaderValue, HeaderValueOption, header_value_option::HeaderAppendAction,
};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::{
    ProcessingMode, processing_mode::BodySendMode,
};
use envoy_types::pb::envoy::service::ext_proc::v3 as ep;
use envoy_types::pb::envoy::r#type::v3::{HttpStatus, StatusCode};
use ep::processing_response::Response as Out;
use serde_json::json;

use super::request::Family;
use crate::policy::{BudgetStatus, Denial, DenyReason, Unit, Window};

pub fn header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            raw_value: value.as_bytes().to_vec(),
            ..Default::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

fn respond(r: Out) -> ep::ProcessingResponse {
    ep::ProcessingResponse {
        response: Some(r),
        ..Default::default()
    }
}

fn common(set_headers: Vec<HeaderValueOption>) -> Option<ep::CommonResponse> {
    let header_mutation = (!set_headers.is_empty()).then(|| ep::HeaderMutation {
        set_headers,
        ..Default::default()
    });
    Some(ep::CommonResponse {
        header_mutation,
        ..Default::default()
    })
}

pub fn request_headers(mode: Option<ProcessingMode>) -> ep::ProcessingResponse {
    ep::ProcessingResponse {
        response: Some(Out::RequestHeaders(ep::HeadersResponse {
            response: common(Vec::new()),
        })),
        mode_override: mode,
        ..Default::default()
    }
}

pub fn response_headers(
    set: Vec<HeaderValueOption>,
    mode: Option<ProcessingMode>,
) -> ep::ProcessingResponse {
    ep::ProcessingResponse {
        response: Some(Out::ResponseHeaders(ep::HeadersResponse {
            response: common(set),
        })),
        mode_override: mode,
        ..Default::default()
    }
}

/// Buffer the request body (one message): the model and output bound are in it.
pub fn buffer_request_body() -> ProcessingMode {
    ProcessingMode {
        request_body_mode: BodySendMode::Buffered as i32,
        ..Default::default()
    }
}

/// Stream the response body to us, chunk by chunk, for metering.
pub fn stream_response_body() -> ProcessingMode {
    ProcessingMode {
        response_body_mode: BodySendMode::Streamed as i32,
        ..Default::default()
    }
}

/// Pass a body chunk unchanged. Allocation-free.
pub fn body_pass(request: bool) -> ep::ProcessingResponse {
    let r = ep::BodyResponse {
        response: Some(ep::CommonResponse::default()),
    };
    respond(if request {
        Out::RequestBody(r)
    } else {
        Out::ResponseBody(r)
    })
}

/// Replace the (buffered) request body; `content-length` follows it.
pub fn request_body_replaced(body: Vec<u8>) -> ep::ProcessingResponse {
    let len = body.len().to_string();
    let r = ep::BodyResponse {
        response: Some(ep::CommonResponse {
            status: ep::common_response::ResponseStatus::ContinueAndReplace as i32,
            header_mutation: Some(ep::HeaderMutation {
                set_headers: vec![header("content-length", &len)],
                ..Default::default()
            }),
            body_mutation: Some(ep::BodyMutation {
                mutation: Some(ep::body_mutation::Mutation::Body(body)),
            }),
            ..Default::default()
        }),
    };
    respond(Out::RequestBody(r))
}

/// Replace one streamed response chunk (the rest of the stream passes unchanged).
pub fn response_body_replaced(body: Vec<u8>) -> ep::ProcessingResponse {
    let r = ep::BodyResponse {
        response: Some(ep::CommonResponse {
            body_mutation: Some(ep::BodyMutation {
                mutation: Some(ep::body_mutation::Mutation::Body(body)),
            }),
            ..Default::default()
        }),
    };
    respond(Out::ResponseBody(r))
}

pub fn trailers_pass(request: bool) -> ep::ProcessingResponse {
    let t = ep::TrailersResponse::default();
    respond(if request {
        Out::RequestTrailers(t)
    } else {
        Out::ResponseTrailers(t)
    })
}

fn immediate(
    code: StatusCode,
    headers: Vec<HeaderValueOption>,
    body: String,
    details: &str,
) -> ep::ProcessingResponse {
    let mut set = vec![header("content-type", "application/json")];
    set.extend(headers);
    respond(Out::ImmediateResponse(ep::ImmediateResponse {
        status: Some(HttpStatus { code: code as i32 }),
        headers: Some(ep::HeaderMutation {
            set_headers: set,
            ..Default::default()
        }),
        body: body.into_bytes(),
        details: details.to_owned(),
        ..Default::default()
    }))
}

/// 401: no identity from any trusted source.
pub fn no_identity(family: Family) -> ep::ProcessingResponse {
    let msg = "No caller identity: this endpoint requires an authenticated principal.";
    let openai = json!({"error": {"message": msg, "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}});
    let mut headers = vec![header("x-should-retry", "false")];
    let body = match family {
        Family::OpenAi => openai,
        Family::Databricks => {
            json!({"error_code": "UNAUTHENTICATED", "message": msg, "error": openai["error"]})
        }
        Family::Anthropic => {
            json!({"type": "error", "error": {"type": "authentication_error", "message": msg}})
        }
        Family::Gemini => {
            json!({"error": {"code": 401, "message": msg, "status": "UNAUTHENTICATED"}})
        }
        Family::Bedrock => {
            headers.push(header("x-amzn-errortype", "AccessDeniedException"));
            json!({"message": msg})
        }
    };
    immediate(
        StatusCode::Unauthorized,
        headers,
        body.to_string(),
        "tokenbudget_no_identity",
    )
}

/// 503: tokenbudget knows no budget state yet (the store has not answered since start and there
/// is no local snapshot) and `admission.no_state = "deny"`. Retrying later is right.
pub fn no_state(family: Family) -> ep::ProcessingResponse {
    let msg = "Budgets are not loaded yet (the budget store is unreachable); retry shortly.";
    let openai = json!({"error": {"message": msg, "type": "server_error", "param": null, "code": "budgets_unavailable"}});
    let mut headers = vec![header("retry-after", "1")];
    let body = match family {
        Family::OpenAi => openai,
        Family::Databricks => {
            json!({"error_code": "TEMPORARILY_UNAVAILABLE", "message": msg, "error": openai["error"]})
        }
        Family::Anthropic => {
            json!({"type": "error", "error": {"type": "overloaded_error", "message": msg}})
        }
        Family::Gemini => {
            json!({"error": {"code": 503, "message": msg, "status": "UNAVAILABLE"}})
        }
        Family::Bedrock => {
            headers.push(header("x-amzn-errortype", "ServiceUnavailableException"));
            json!({"message": msg})
        }
    };
    immediate(
        StatusCode::ServiceUnavailable,
        headers,
        body.to_string(),
        "tokenbudget_no_state",
    )
}

/// 429 (budget exhausted, or a request that can never fit) or 403 (unpriced model).
pub fn denied(
    d: &Denial,
    family: Family,
    request_id: &str,
    now: DateTime<Utc>,
) -> ep::ProcessingResponse {
    let s = &d.status;
    let message = deny_message(d);
    let resets_at = s
        .resets_at
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true));
    let (code, status, kind) = match d.reason {
        DenyReason::ModelNotPriced => (
            "model_not_priced",
            StatusCode::Forbidden,
            "tokenbudget_model_not_priced",
        ),
        DenyReason::NeverFits | DenyReason::Exhausted | DenyReason::NeedsLease => (
            "budget_exceeded",
            StatusCode::TooManyRequests,
            "tokenbudget_budget_exhausted",
        ),
    };
    let detail = json!({
        "budget": s.name,
        "window": s.window.to_string(),
        "unit": s.unit.as_str(),
        "used": show_plain(s.unit, s.used),
        "reserved": show_plain(s.unit, s.reserved),
        "limit": show_plain(s.unit, s.limit),
        "requested": show_plain(s.unit, d.requested),
        "resets_at": resets_at,
    });
    let unpriced = d.reason == DenyReason::ModelNotPriced;
    let mut headers = vec![header("x-should-retry", "false")];
    let openai = || {
        let err_type = if unpriced {
            "invalid_request_error"
        } else {
            "insufficient_quota"
        };
        json!({"error": {"message": message, "type": err_type, "param": null, "code": code, "tokenbudget": detail}})
    };
    let body = match family {
        Family::OpenAi => openai(),
        Family::Databricks => {
            let native = if unpriced {
                "PERMISSION_DENIED"
            } else {
                "REQUEST_LIMIT_EXCEEDED"
            };
            json!({"error_code": native, "message": message, "error": openai()["error"]})
        }
        Family::Anthropic => {
            let err_type = if unpriced {
                "permission_error"
            } else {
                "rate_limit_error"
            };
            json!({"type": "error", "error": {"type": err_type, "message": message, "details": {"error_code": code}}, "request_id": request_id})
        }
        Family::Gemini => {
            let (n, st, reason) = if unpriced {
                (403, "PERMISSION_DENIED", "MODEL_NOT_PRICED")
            } else {
                (429, "RESOURCE_EXHAUSTED", "BUDGET_EXCEEDED")
            };
            json!({"error": {"code": n, "message": message, "status": st, "details": [{
                "@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason, "domain": "tokenbudget",
                "metadata": {"budget": s.name, "resets_at": resets_at.clone().unwrap_or_default()}}]}})
        }
        Family::Bedrock => {
            let kind = if unpriced {
                "AccessDeniedException"
            } else {
                "ThrottlingException"
            };
            headers.push(header("x-amzn-errortype", kind));
            json!({"message": message})
        }
    };
    if d.reason == DenyReason::Exhausted
        && let Some(secs) = s.reset_after(now)
    {
        headers.push(header("retry-after", &secs.to_string()));
    }
    if d.reason != DenyReason::ModelNotPriced {
        let suffix = s.unit.as_str();
        headers.push(header(
            &format!("x-ratelimit-limit-{suffix}"),
            &show_plain(s.unit, s.limit),
        ));
        headers.push(header(
            &format!("x-ratelimit-remaining-{suffix}"),
            &show_plain(s.unit, s.remaining()),
        ));
        if let Some(secs) = s.reset_after(now) {
            headers.push(header(
                &format!("x-ratelimit-reset-{suffix}"),
                &go_duration(secs),
            ));
        }
        headers.extend(budget_headers(s, now, BudgetHeaders::All));
    }
    immediate(status, headers, body.to_string(), kind)
}

pub(crate) fn deny_message(d: &Denial) -> String {
    let s = &d.status;
    let window = match s.window {
        Window::Total => "in total".to_string(),
        w => format!("per {w}"),
    };
    let resets = match s.resets_at {
        Some(t) => format!("resets {}", t.to_rfc3339_opts(SecondsFormat::Secs, true)),
        None => "never resets".to_string(),
    };
    let in_flight = if s.reserved > 0 {
        format!(
            " ({} reserved by requests in flight)",
            s.unit.show(s.reserved)
        )
    } else {
        String::new()
    };
    match d.reason {
        DenyReason::Exhausted | DenyReason::NeedsLease => format!(
            "Budget '{}' exhausted: used {}{in_flight} of {} {window}; this request needs up to {}; {resets}.",
            s.name,
            s.unit.show(s.used),
            s.unit.show(s.limit),
            s.unit.show(d.requested),
        ),
        DenyReason::NeverFits => format!(
            "Request can never fit budget '{}': it needs up to {} but the limit is {} {window}. Lower max_tokens.",
            s.name,
            s.unit.show(d.requested),
            s.unit.show(s.limit),
        ),
        DenyReason::ModelNotPriced => format!(
            "Model has no price, so USD budget '{}' cannot be enforced; ask an admin to set a price for it.",
            s.name
        ),
    }
}

/// Which budget headers allowed responses carry (429s carry them all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetHeaders {
    /// `x-tokenbudget-*` and the IETF `RateLimit-Policy` / `RateLimit`. Together they make the
    /// response-headers reply larger than HTTP/2's 256-byte write-combining threshold, which
    /// costs one more socket write per request (measured in BENCHMARKS.md).
    All,
    Tokenbudget,
    Ratelimit,
    None,
}

/// Our own headers and the IETF draft's for the binding budget, on allowed responses and 429s.
pub fn budget_headers(
    s: &BudgetStatus,
    now: DateTime<Utc>,
    set: BudgetHeaders,
) -> Vec<HeaderValueOption> {
    let name = sf_string(&s.name);
    let remaining = s.remaining();
    let mut out = Vec::with_capacity(6);
    let ours = matches!(set, BudgetHeaders::All | BudgetHeaders::Tokenbudget);
    let ietf = matches!(set, BudgetHeaders::All | BudgetHeaders::Ratelimit);
    if ours {
        out.push(header("x-tokenbudget-limit", &show_plain(s.unit, s.limit)));
        out.push(header(
            "x-tokenbudget-remaining",
            &show_plain(s.unit, remaining),
        ));
        out.push(header("x-tokenbudget-unit", s.unit.as_str()));
        if let Some(t) = s.reset_after(now) {
            out.push(header("x-tokenbudget-reset", &t.to_string()));
        }
    }
    if !ietf {
        return out;
    }
    // The IETF draft's quota is an integer: USD budgets are expressed in micro-dollars.
    let (q, r) = match s.unit {
        Unit::Tokens => (s.limit, remaining),
        Unit::Usd => (s.limit / 1_000, remaining / 1_000),
    };
    let unit_param = match s.unit {
        Unit::Tokens => "tokens",
        Unit::Usd => "usd-micros",
    };
    let mut policy = format!("{name};q={q}");
    if let Some(w) = s.window.nominal_seconds() {
        policy.push_str(&format!(";w={w}"));
    }
    policy.push_str(&format!(";tb-unit=\"{unit_param}\""));
    let mut limit = format!("{name};r={r}");
    if let Some(t) = s.reset_after(now) {
        limit.push_str(&format!(";t={t}"));
    }
    out.push(header("ratelimit-policy", &policy));
    out.push(header("ratelimit", &limit));
    out
}

/// An amount as a plain number: tokens, or dollars with at least two decimals.
fn show_plain(unit: Unit, v: u64) -> String {
    match unit {
        Unit::Tokens => v.to_string(),
        Unit::Usd => crate::policy::NanoUsd(v).to_string(),
    }
}

/// A structured-field string: printable ASCII, with `"` and `\` escaped.
fn sf_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => out.push('?'),
        }
    }
    out.push('"');
    out
}

/// Seconds as a Go duration, the format of OpenAI's `x-ratelimit-reset-*` headers: `6m0s`.
pub fn go_duration(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Action, BudgetId, WindowUnit};

    fn status(unit: Unit, used: u64, limit: u64) -> BudgetStatus {
        BudgetStatus {
            budget: BudgetId("b".into()),
            name: "alice \"daily\"".into(),
            window: Window::Calendar {
                unit: WindowUnit::Day,
                every: 1,
            },
            action: Action::Enforce,
            unit,
            limit,
            used,
            reserved: 0,
            resets_at: Some(
                DateTime::parse_from_rfc3339("2026-12-04T00:00:00Z")
                    .unwrap()
                    .with_timezone(&Utc),
            ),
        }
    }

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-12-03T23:54:00.500Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn headers_of(r: &ep::ProcessingResponse) -> Vec<(String, String)> {
        let Some(Out::ImmediateResponse(i)) = &r.response else {
            panic!("not immediate")
        };
        i.headers
            .as_ref()
            .unwrap()
            .set_headers
            .iter()
            .map(|h| {
                let h = h.header.as_ref().unwrap();
                assert!(h.value.is_empty(), "only raw_value is set");
                (
                    h.key.clone(),
                    String::from_utf8(h.raw_value.clone()).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn exhausted_budget_gets_an_openai_shaped_429() {
        let d = Denial {
            status: status(Unit::Tokens, 990, 1000),
            reason: DenyReason::Exhausted,
            requested: 110,
        };
        let r = denied(&d, Family::OpenAi, "req-1", now());
        let Some(Out::ImmediateResponse(i)) = &r.response else {
            panic!()
        };
        assert_eq!(i.status.as_ref().unwrap().code, 429);
        assert_eq!(i.details, "tokenbudget_budget_exhausted");
        let body: serde_json::Value = serde_json::from_slice(&i.body).unwrap();
        assert_eq!(body["error"]["code"], "budget_exceeded");
        assert_eq!(body["error"]["type"], "insufficient_quota");
        assert_eq!(
            body["error"]["tokenbudget"]["resets_at"],
            "2026-12-04T00:00:00Z"
        );
        assert_eq!(
            body["error"]["message"],
            "Budget 'alice \"daily\"' exhausted: used 990 of 1000 per day; this request needs up to 110; resets 2026-12-04T00:00:00Z."
        );
        let h = headers_of(&r);
        let get = |k: &str| h.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("retry-after"), Some("360"));
        assert_eq!(get("x-should-retry"), Some("false"));
        assert_eq!(get("x-ratelimit-limit-tokens"), Some("1000"));
        assert_eq!(get("x-ratelimit-remaining-tokens"), Some("10"));
        assert_eq!(get("x-ratelimit-reset-tokens"), Some("6m0s"));
        assert_eq!(
            get("ratelimit-policy"),
            Some(r#""alice \"daily\"";q=1000;w=86400;tb-unit="tokens""#)
        );
        assert_eq!(get("ratelimit"), Some(r#""alice \"daily\"";r=10;t=360"#));
        assert_eq!(get("content-type"), Some("application/json"));
    }

    #[test]
    fn anthropic_routes_get_anthropic_errors() {
        let d = Denial {
            status: status(Unit::Usd, 5_000_000_000, 5_000_000_000),
            reason: DenyReason::Exhausted,
            requested: 1,
        };
        let r = denied(&d, Family::Anthropic, "req-9", now());
        let Some(Out::ImmediateResponse(i)) = &r.response else {
            panic!()
        };
        let body: serde_json::Value = serde_json::from_slice(&i.body).unwrap();
        assert_eq!(body["type"], "error");
        assert_eq!(body["error"]["type"], "rate_limit_error");
        assert_eq!(body["error"]["details"]["error_code"], "budget_exceeded");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("used $5.00 of $5.00")
        );
        let h = headers_of(&r);
        assert!(
            h.iter()
                .any(|(k, v)| k == "x-ratelimit-limit-usd" && v == "5.00")
        );
    }

    #[test]
    fn never_fits_and_unpriced_have_no_retry_after() {
        let d = Denial {
            status: status(Unit::Tokens, 0, 100),
            reason: DenyReason::NeverFits,
            requested: 4096,
        };
        assert!(
            !headers_of(&denied(&d, Family::OpenAi, "r", now()))
                .iter()
                .any(|(k, _)| k == "retry-after")
        );
        let d = Denial {
            status: status(Unit::Usd, 0, 100),
            reason: DenyReason::ModelNotPriced,
            requested: 0,
        };
        let r = denied(&d, Family::OpenAi, "r", now());
        let Some(Out::ImmediateResponse(i)) = &r.response else {
            panic!()
        };
        assert_eq!(i.status.as_ref().unwrap().code, 403);
        let body: serde_json::Value = serde_json::from_slice(&i.body).unwrap();
        assert_eq!(body["error"]["code"], "model_not_priced");
    }

    #[test]
    fn go_durations() {
        assert_eq!(go_duration(0), "0s");
        assert_eq!(go_duration(61), "1m1s");
        assert_eq!(go_duration(3600), "1h0m0s");
    }
}
