//! The fake OpenAI-compatible model used by the tests, as a standalone server for the demo:
//! `cargo run --example fake_model -- 127.0.0.1:8000`. Behaviour per request is set by
//! `x-fake-*` headers (see `tests/it/fake_model.rs`).

#[path = "../tests/it/fake_model.rs"]
mod fake_model;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8000".to_string());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("fake model listening on {}", listener.local_addr()?);
    // FAKE_RECORD=0: keep no record of requests (long benchmarks).
    let fake = if std::env::var("FAKE_RECORD").as_deref() == Ok("0") {
        fake_model::FakeModel::forgetful()
    } else {
        fake_model::FakeModel::default()
    };
    fake_model::serve(listener, fake).await
}
