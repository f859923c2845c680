//! What the fault-injection tests need beyond the stack: tokenbudget as a real process (to
//! SIGKILL, SIGSTOP and SIGTERM it), and a private Postgres server (to stop and start it without
//! disturbing the tests that share the machine's server).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::harness::{eventually, sidecar_toml};

/// A port that was free a moment ago (for processes that cannot report what they bound).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill {sig} {pid}");
}

/// `tokenbudget serve` as a child process, on fixed ports so a restart takes the same ones.
pub struct SidecarProc {
    child: Option<Child>,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    config: PathBuf,
    log: PathBuf,
    starts: u32,
}

impl SidecarProc {
    /// Writes a config (see [`sidecar_toml`]) into `dir` and starts the binary on it.
    pub async fn start(dir: &Path, store_toml: &str, ledger: &str, extra: &str) -> SidecarProc {
        let mut p = SidecarProc::configure(dir, store_toml, ledger, extra);
        p.spawn().await;
        p
    }

    /// Writes the config and starts the process without waiting for it to be ready.
    pub fn start_unready(dir: &Path, store_toml: &str, ledger: &str, extra: &str) -> SidecarProc {
        let mut p = SidecarProc::configure(dir, store_toml, ledger, extra);
        p.launch();
        p
    }

    fn configure(dir: &Path, store_toml: &str, ledger: &str, extra: &str) -> SidecarProc {
        let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let toml = sidecar_toml(store_toml, &dir.join("journal"), ledger, extra)
            .replacen(
                "grpc_listen = \"127.0.0.1:0\"",
                &format!("grpc_listen = \"{grpc}\""),
                1,
            )
            .replacen(
                "admin_listen = \"127.0.0.1:0\"",
                &format!("admin_listen = \"{admin}\""),
                1,
            );
        let config = dir.join("tokenbudget.toml");
        std::fs::write(&config, toml).unwrap();
        SidecarProc {
            child: None,
            grpc,
            admin,
            config,
            log: dir.join("tokenbudget.log"),
            starts: 0,
        }
    }

    /// Starts the process (again) and waits until it is ready.
    pub async fn spawn(&mut self) {
        self.launch();
        self.wait_ready().await;
    }

    fn launch(&mut self) {
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tokenbudget"))
            .arg("--config")
            .arg(&self.config)
            .arg("serve")
            .env("TOKENBUDGET_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub async fn wait_ready(&self) {
        let url = format!("http://{}/readyz", self.admin);
        let client = reqwest::Client::new();
        eventually("tokenbudget ready", Duration::from_secs(30), || {
            let (c, u) = (client.clone(), url.clone());
            async move { matches!(c.get(u).send().await, Ok(r) if r.status() == 200) }
        })
        .await;
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap()
    }

    /// SIGKILL: no drain, no flush; waits until the process is gone.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), "-KILL");
            let _ = c.wait();
        }
    }

    /// SIGSTOP / SIGCONT: the process is there but answers nothing.
    pub fn pause(&self) {
        signal(self.pid(), "-STOP");
    }

    pub fn resume(&self) {
        signal(self.pid(), "-CONT");
    }

    /// SIGTERM; returns the exit status once the process has drained and exited.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().unwrap();
        signal(c.id(), "-TERM");
        tokio::task::spawn_blocking(move || c.wait().unwrap())
            .await
            .unwrap()
    }

    /// Starts SIGTERM; the process is collected by [`SidecarProc::wait_exit`].
    pub fn send_term(&self) {
        signal(self.pid(), "-TERM");
    }

    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().unwrap();
        tokio::task::spawn_blocking(move || c.wait().unwrap())
            .await
            .unwrap()
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }
}

impl Drop for SidecarProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A Postgres server of its own (initdb in a temporary directory, run as the `postgres` user
/// when the tests run as root), so a test can stop and start it.
pub struct PrivatePostgres {
    dir: tempfile::TempDir,
    pub port: u16,
    bin: PathBuf,
}

fn pg_bin() -> PathBuf {
    let base = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<PathBuf> = std::fs::read_dir(base)
        .expect("Postgres server binaries under /usr/lib/postgresql")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("pg_ctl").exists())
        .collect();
    versions.sort();
    versions.pop().expect("pg_ctl")
}

fn as_postgres(bin: &Path, tool: &str) -> Command {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if is_root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        c
    } else {
        Command::new(bin.join(tool))
    }
}

impl PrivatePostgres {
    pub fn start() -> PrivatePostgres {
        let dir = tempfile::tempdir().unwrap();
        let _ = Command::new("chown")
            .args(["postgres", &dir.path().display().to_string()])
            .status();
        let bin = pg_bin();
        let out = as_postgres(&bin, "initdb")
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(dir.path().join("data"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pg = PrivatePostgres {
            dir,
            port: free_port(),
            bin,
        };
        pg.up();
        pg
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server and waits until it accepts connections.
    pub fn up(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let out = as_postgres(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-o", &opts, "-l"])
            .arg(self.dir.path().join("log"))
            .args(["-w", "start"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops the server at once (`-m fast`: open connections are cut).
    pub fn down(&self) {
        let out = as_postgres(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "fast", "-w", "stop"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}
