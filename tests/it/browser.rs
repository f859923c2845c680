//! The web UI in a real headless Chromium (Debian's chromium + chromium-driver), driven over the
//! W3C WebDriver protocol: sign in with a token, create a group budget through the form, drive
//! metered traffic through real Envoy, and see the dashboard chart and the budget's usage bar
//! reflect it. Screenshots of every page go to `target/ui-screenshots/`; any console error fails.
//!
//! The WebDriver client is a few HTTP calls made here: the test also needs chromedriver's
//! browser-log endpoint, which the WebDriver crates do not expose.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::harness::{ADMIN_TOKEN, Backend, Stack, eventually, read_all, repo_path};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

struct Browser {
    http: reqwest::Client,
    session: String,
    base: String,
    _driver: Child,
    shots: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Browser {
    async fn start() -> Browser {
        let driver_bin = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let port = free_port();
        let driver = Command::new(&driver_bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run {driver_bin} (apt install chromium chromium-driver): {e}")
            });
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let status = format!("{base}/status");
        eventually("chromedriver up", Duration::from_secs(20), || {
            let (h, u) = (http.clone(), status.clone());
            async move { h.get(u).send().await.is_ok() }
        })
        .await;
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()),
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                         "--disable-dev-shm-usage", "--window-size=1400,1000"]
            },
            "goog:loggingPrefs": {"browser": "ALL"}
        }}});
        let resp: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = resp["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {resp}"))
            .to_string();
        let shots = repo_path("target/ui-screenshots");
        std::fs::create_dir_all(&shots).unwrap();
        Browser {
            http,
            session,
            base,
            _driver: driver,
            shots,
        }
    }

    async fn cmd(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut req = self.http.request(method, url);
        if !body.is_null() {
            req = req.json(&body);
        }
        let v: Value = req.send().await.unwrap().json().await.unwrap();
        v["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", json!({ "url": url }))
            .await;
    }

    async fn try_find(&self, css: &str) -> Option<String> {
        let v = self
            .cmd(
                reqwest::Method::POST,
                "/element",
                json!({"using": "css selector", "value": css}),
            )
            .await;
        v[ELEMENT].as_str().map(str::to_string)
    }

    /// Waits for an element matching `css`.
    async fn find(&self, css: &str) -> String {
        eventually(
            &format!("element {css}"),
            Duration::from_secs(10),
            || async { self.try_find(css).await.is_some() },
        )
        .await;
        self.try_find(css).await.unwrap()
    }

    async fn click(&self, css: &str) {
        let el = self.find(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{el}/click"),
            json!({}),
        )
        .await;
    }

    async fn type_into(&self, css: &str, text: &str) {
        let el = self.find(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{el}/clear"),
            json!({}),
        )
        .await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{el}/value"),
            json!({ "text": text }),
        )
        .await;
    }

    async fn js(&self, script: &str, args: Value) -> Value {
        self.cmd(
            reqwest::Method::POST,
            "/execute/sync",
            json!({"script": script, "args": args}),
        )
        .await
    }

    async fn select(&self, css: &str, value: &str) {
        self.find(css).await;
        self.js(
            "const el = document.querySelector(arguments[0]); el.value = arguments[1]; \
             el.dispatchEvent(new Event('change'));",
            json!([css, value]),
        )
        .await;
    }

    async fn text(&self, css: &str) -> String {
        self.find(css).await;
        self.js(
            "return document.querySelector(arguments[0]).textContent",
            json!([css]),
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    async fn screenshot(&self, name: &str) {
        let v = self
            .cmd(reqwest::Method::GET, "/screenshot", Value::Null)
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap();
        assert!(png.len() > 1000, "screenshot {name} is empty");
        std::fs::write(self.shots.join(format!("{name}.png")), png).unwrap();
    }

    /// Browser console entries at level SEVERE (errors), since the last call.
    async fn console_errors(&self) -> Vec<String> {
        let v = self
            .cmd(reqwest::Method::POST, "/se/log", json!({"type": "browser"}))
            .await;
        v.as_array()
            .unwrap_or_else(|| panic!("no browser log from chromedriver: {v}"))
            .iter()
            .filter(|e| e["level"] == "SEVERE")
            .map(|e| e["message"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    async fn page_is(&self, page: &str) {
        self.find(&format!("body[data-page=\"{page}\"]")).await;
    }

    async fn close(self) {
        self.cmd(reqwest::Method::DELETE, "", Value::Null).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_manages_budgets_and_sees_traffic_in_a_real_browser() {
    let stack = Stack::start(Backend::Sqlite).await;
    let b = Browser::start().await;
    let home = stack.admin_url("/");
    let at = |hash: &str| format!("{home}#/{hash}");

    // Sign in.
    b.goto(&home).await;
    b.find("#login-token").await;
    b.screenshot("01-login").await;
    b.type_into("#login-token", ADMIN_TOKEN).await;
    b.click("#login-submit").await;
    b.page_is("dashboard").await;
    assert_eq!(b.text("#whoami-name").await, "tester (admin)");
    b.find("#chart-empty").await;

    // Create a group budget through the form.
    b.goto(&at("budgets/new")).await;
    b.find("#budget-form").await;
    b.type_into("#f-name", "eng daily").await;
    b.select("#f-subject-kind", "group").await;
    b.type_into("#f-subject-name", "eng").await;
    b.select("#f-unit", "tokens").await;
    b.type_into("#f-limit", "5000").await;
    let hint = b.text("#f-hint").await;
    assert!(hint.contains("gpt-4o"), "conversion hint: {hint}");
    b.select("#f-window", "day").await;
    b.screenshot("02-budget-form").await;
    b.click("#f-save").await;
    b.page_is("budgets").await;
    let row = "tr[data-budget=\"eng daily\"]";
    b.find(row).await;
    let listed = b.text(row).await;
    assert!(listed.contains("group:eng"), "{listed}");
    assert!(listed.contains("All models"), "{listed}");
    assert!(listed.contains("0 of 5,000"), "{listed}");
    let policy = stack.sidecar().ledger.policy();
    let created = policy
        .budgets
        .iter()
        .find(|x| x.name == "eng daily")
        .expect("the form's budget is enforced");
    assert_eq!(created.subject.to_string(), "group:eng");

    // Members added on the groups page.
    for user in ["alice", "bob"] {
        b.goto(&at("groups")).await;
        b.page_is("groups").await;
        b.type_into("#g-group", "eng").await;
        b.type_into("#g-principal", user).await;
        b.click("#g-add").await;
        b.find(&format!("[data-member=\"user:{user}\"]")).await;
    }

    // Metered traffic through real Envoy: 2 × 400 tokens by members of eng.
    for user in ["alice", "bob"] {
        let r = stack
            .chat(
                user,
                json!({"model": "gpt-4o", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}),
            )
            .header("x-fake-usage", "300,100")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        read_all(r).await;
    }
    stack.events(2).await;

    // The budget's usage bar reflects it.
    b.goto(&at("dashboard")).await;
    b.page_is("dashboard").await;
    b.goto(&at("budgets")).await;
    b.page_is("budgets").await;
    let fill = format!("{row} .bar-fill");
    b.find(&fill).await;
    let fraction = b
        .js(
            "return document.querySelector(arguments[0]).dataset.fraction",
            json!([fill]),
        )
        .await;
    assert_eq!(fraction, "0.16", "800 of 5000");
    assert!(b.text(row).await.contains("800 of 5,000"));
    b.screenshot("03-budgets").await;

    // The dashboard chart reflects it: one model, 800 tokens in all.
    b.goto(&at("dashboard")).await;
    b.find("#usage-chart rect.bar-seg").await;
    let total = b
        .js(
            "return [...document.querySelectorAll('#usage-chart rect.bar-seg')]\
               .reduce((a, r) => a + Number(r.dataset.value), 0)",
            json!([]),
        )
        .await;
    assert_eq!(total.as_f64(), Some(800.0));
    assert_eq!(
        b.js(
            "return document.querySelector('#usage-chart').dataset.models",
            json!([])
        )
        .await,
        "gpt-4o"
    );
    assert_eq!(b.text("#kpi-tokens").await, "800");
    let top = b.text("main").await;
    assert!(
        top.contains("user:alice") && top.contains("user:bob"),
        "{top}"
    );
    b.screenshot("04-dashboard").await;
    b.click("[data-metric=\"usd\"]").await;
    b.find("[data-metric=\"usd\"].on").await;
    b.find("#usage-chart rect.bar-seg").await;
    b.screenshot("05-dashboard-usd").await;

    // The other pages render.
    b.goto(&at("principal/user%3Aalice")).await;
    b.find("#principal-budgets tr[data-budget=\"eng daily\"]")
        .await;
    b.screenshot("06-principal").await;
    b.goto(&at("prices")).await;
    b.find("tr[data-model=\"gpt-4o\"]").await;
    b.screenshot("07-prices").await;
    b.goto(&at("groups")).await;
    b.page_is("groups").await;
    b.screenshot("08-groups").await;
    b.goto(&at("audit")).await;
    b.page_is("audit").await;
    assert!(b.text("main").await.contains("budget.create"));
    b.screenshot("09-audit").await;
    b.goto(&at("budgets/edit/eng%20daily")).await;
    b.find("#budget-form").await;
    b.screenshot("10-budget-edit").await;

    // Delete with confirmation.
    b.goto(&at("budgets")).await;
    b.page_is("budgets").await;
    b.click(&format!("{row} button.delete")).await;
    b.click("#confirm-ok").await;
    eventually("the budget gone", Duration::from_secs(5), || async {
        b.try_find(row).await.is_none()
    })
    .await;
    assert!(
        !stack
            .sidecar()
            .ledger
            .policy()
            .budgets
            .iter()
            .any(|x| x.name == "eng daily")
    );

    let errors = b.console_errors().await;
    assert!(errors.is_empty(), "console errors: {errors:#?}");
    b.close().await;
}
