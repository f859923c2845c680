//! Wiring and the start/stop order. The only module that knows every other one.
//!
//! Start: open the store (and migrate) → load policy and counters → bind gRPC and admin ports →
//! start the batch writer and both servers.
//! Stop: stop accepting ext_proc streams and let open ones finish (up to the grace period; each
//! settles as it ends) → stop the writer, which flushes every queued debit → stop the admin port.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::{self, AdminState};
use crate::clock::SharedClock;
use crate::config::Config;
use crate::extproc::ExtProcService;
use crate::ledger::journal::{self, Journal};
use crate::ledger::lease;
use crate::ledger::{Ledger, writer};
use crate::store::{Store, StoreError};

/// gRPC health service name Envoy's health checks ask for.
pub const HEALTH_SERVICE: &str = "envoy.service.ext_proc.v3.ExternalProcessor";

pub struct Running {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub ledger: Arc<Ledger>,
    pub store: Store,
    pub extproc: ExtProcService,
    stop_grpc: watch::Sender<bool>,
    stop_writer: watch::Sender<bool>,
    stop_admin: watch::Sender<bool>,
    grpc: tokio::sync::oneshot::Receiver<anyhow::Result<()>>,
    writer: JoinHandle<()>,
    admin: JoinHandle<std::io::Result<()>>,
    journal: Option<std::thread::JoinHandle<Journal>>,
    listener: Option<JoinHandle<()>>,
    stop_lease: watch::Sender<bool>,
    lease_task: Option<JoinHandle<()>>,
    /// Gives back the holds of QuotaService reservations nobody committed.
    quota_sweeper: JoinHandle<()>,
    health: tonic_health::server::HealthReporter,
    grace: Duration,
}

/// Opens the store and, when configured, migrates it (the CLI's path: a store that cannot be
/// reached is an error here).
pub async fn open_store(config: &Config, clock: &SharedClock) -> anyhow::Result<Store> {
    let store = Store::open(&config.store)
        .await
        .context("opening the store")?;
    if config.migrate_on_start {
        store
            .migrate(clock.now().timestamp_millis())
            .await
            .context("migrating the store")?;
    }
    Ok(store)
}

/// Runs the ext_proc gRPC server on its own thread and runtime: one thread (a current-thread
/// runtime, measured the cheapest per message) or `workers` threads. The server is built inside
/// that runtime by `serve`, which gets the listener (`incoming`) adopted there.
fn serve_grpc<F, Fut, I>(
    workers: usize,
    serve: impl FnOnce(I) -> Fut + Send + 'static,
    incoming: F,
) -> anyhow::Result<tokio::sync::oneshot::Receiver<anyhow::Result<()>>>
where
    F: FnOnce() -> std::io::Result<I> + Send + 'static,
    Fut: Future<Output = Result<(), tonic::transport::Error>>,
{
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let runtime = if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("tokenbudget-grpc")
            .enable_all()
            .build()?
    };
    std::thread::Builder::new()
        .name("tokenbudget-grpc".into())
        .spawn(move || {
            let result = runtime.block_on(async move {
                let incoming = incoming().context("adopting the gRPC listener")?;
                serve(incoming).await.context("gRPC server")
            });
            let _ = done_tx.send(result);
        })
        .context("starting the gRPC thread")?;
    Ok(done_rx)
}

/// How long `serve` waits for the store at start before it serves from its snapshot.
const STORE_STARTUP_WAIT: Duration = Duration::from_secs(10);

pub async fn start(config: Config, clock: SharedClock) -> anyhow::Result<Running> {
    let store = Store::open(&config.store)
        .await
        .context("opening the store")?;
    let ledger = Ledger::new(
        config.policy_settings(),
        Arc::clone(&clock),
        config.queue_capacity,
        Arc::new(crate::metrics::Metrics::new()),
    );
    let leases = config.lease.map(|cfg| {
        let (client, rx) = lease::channel(cfg);
        ledger.use_leases(client);
        (cfg, rx)
    });
    // Debits an earlier process settled but the store may not have: counted and queued again
    // before anything else (the store ignores the ones it already has).
    let sync_every = config.journal_sync;
    let journal = match &config.journal_dir {
        Some(dir) => {
            let (j, old) = Journal::open(dir).context("opening the journal")?;
            if !old.is_empty() {
                tracing::info!(records = old.len(), dir = %dir.display(), "replaying the journal");
                ledger.metrics.journal_replayed.inc_by(old.len() as u64);
            }
            ledger.replay(old);
            ledger.start_journaling();
            let l = Arc::clone(&ledger);
            Some(
                std::thread::Builder::new()
                    .name("tokenbudget-journal".into())
                    .spawn(move || journal::run(l, j, sync_every))
                    .context("starting the journal thread")?,
            )
        }
        None => None,
    };
    let startup = writer::Startup {
        migrate: config.migrate_on_start,
        budgets: config.budgets.clone(),
        snapshot: config.journal_dir.as_ref().map(|d| d.join("state.json")),
    };
    let prepared = match tokio::time::timeout(
        STORE_STARTUP_WAIT,
        writer::prepare(&ledger, &store, &startup),
    )
    .await
    {
        Ok(Ok(())) => true,
        Ok(Err(StoreError::Unavailable(e))) => {
            tracing::warn!(error = %e, "store unreachable at start");
            false
        }
        Err(_) => {
            tracing::warn!("store did not answer at start");
            false
        }
        Ok(Err(e)) => return Err(e).context("loading budgets and counters"),
    };
    if !prepared && !writer::restore_snapshot(&ledger, &startup) {
        tracing::warn!(
            no_state = ?config.extproc.no_state,
            "no local snapshot either: no budget is known until the store answers"
        );
    }

    let grpc_listener = std::net::TcpListener::bind(config.grpc_listen)
        .with_context(|| format!("binding gRPC on {}", config.grpc_listen))?;
    grpc_listener.set_nonblocking(true)?;
    let admin_listener = TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("binding admin HTTP on {}", config.admin_listen))?;
    let grpc_addr = grpc_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;

    let (stop_writer, writer_rx) = watch::channel(false);
    let writer = tokio::spawn(writer::run(
        Arc::clone(&ledger),
        store.clone(),
        config.writer,
        startup,
        prepared,
        writer_rx,
    ));

    let (stop_lease, lease_rx) = watch::channel(false);
    let lease_task = leases.map(|(cfg, rx)| {
        tokio::spawn(lease::run(
            Arc::clone(&ledger),
            store.clone(),
            cfg,
            rx,
            lease_rx,
        ))
    });
    let listener = {
        let l = Arc::clone(&ledger);
        store.listen(move || l.notify_policy_changed())
    };
    let extproc = ExtProcService::new(config.extproc.clone(), Arc::clone(&ledger));
    let (health, health_svc) = tonic_health::server::health_reporter();
    // Envoy's health checks steer traffic to other replicas while this one knows no budget and
    // would refuse every request.
    let serves = ledger.is_ready() || config.extproc.no_state == crate::extproc::NoState::Allow;
    health
        .set_service_status(
            HEALTH_SERVICE,
            if serves {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            },
        )
        .await;
    if !serves {
        let (l, h) = (Arc::clone(&ledger), health.clone());
        tokio::spawn(async move {
            while !l.is_ready() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            if !l.is_draining() {
                h.set_service_status(HEALTH_SERVICE, tonic_health::ServingStatus::Serving)
                    .await;
            }
        });
    }
    let quota = crate::quota::Quota::new(
        Arc::clone(&ledger),
        crate::quota::QuotaConfig {
            tokens: config
                .quota_tokens
                .iter()
                .chain(&config.admin_tokens)
                .cloned()
                .collect(),
            default_output_tokens: config.extproc.default_output_tokens,
            max_output_reservation: config.extproc.max_output_reservation,
            reservation_ttl: config.extproc.reservation_ttl,
            deny_without_state: config.extproc.no_state == crate::extproc::NoState::Deny,
        },
    );
    let quota_sweeper = tokio::spawn(crate::quota::sweep_every(Arc::clone(&quota)));
    let (stop_grpc, mut grpc_rx) = watch::channel(false);
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .initial_stream_window_size(Some(1 << 20))
        .initial_connection_window_size(Some(4 << 20))
        // Envoy resets one stream per client disconnect; under a burst of disconnects the default
        // guard (~20 pending resets) would close Envoy's only connection and fail every request on it.
        .http2_max_pending_accept_reset_streams(Some(100_000))
        .http2_max_local_error_reset_streams(Some(100_000))
        .add_service(health_svc)
        .add_service(quota.server())
        .add_service(crate::extproc::server::ExtProcServer(extproc.clone()));
    // Socket options set on the builder apply only when tonic binds itself; an incoming stream
    // needs its own, or Nagle + delayed ACK add ~40 ms to every small reply. The listener is
    // adopted by the gRPC runtime when it starts.
    let incoming = move || {
        Ok::<_, std::io::Error>(
            tonic::transport::server::TcpIncoming::from(TcpListener::from_std(grpc_listener)?)
                .with_nodelay(Some(true))
                .with_keepalive(Some(Duration::from_secs(60))),
        )
    };
    let grpc = serve_grpc(
        config.grpc_workers,
        move |incoming| {
            server.serve_with_incoming_shutdown(incoming, async move {
                let _ = grpc_rx.wait_for(|stop| *stop).await;
            })
        },
        incoming,
    )?;

    let (stop_admin, mut admin_rx) = watch::channel(false);
    if config.admin_tokens.is_empty() {
        tracing::warn!(
            "no admin tokens configured ([[admin.tokens]]): the admin API refuses every request"
        );
    }
    let app = admin::router(AdminState {
        ledger: Arc::clone(&ledger),
        store: store.clone(),
        tokens: config.admin_tokens.clone().into(),
        default_output_tokens: config.extproc.default_output_tokens,
        cors_origins: config.cors_origins.clone(),
        serves_without_state: config.extproc.no_state == crate::extproc::NoState::Allow,
    });
    let admin = tokio::spawn(async move {
        axum::serve(
            admin_listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            }),
            app,
        )
        .with_graceful_shutdown(async move {
            let _ = admin_rx.wait_for(|stop| *stop).await;
        })
        .await
    });
    tracing::info!(%grpc_addr, %admin_addr, store = store.backend(), "tokenbudget serving");
    Ok(Running {
        grpc_addr,
        admin_addr,
        ledger,
        store,
        extproc,
        stop_grpc,
        stop_writer,
        stop_admin,
        grpc,
        writer,
        admin,
        journal,
        listener,
        stop_lease,
        lease_task,
        quota_sweeper,
        health,
        grace: config.shutdown_grace,
    })
}

impl Running {
    /// Graceful stop: refuse new streams, let open ones finish (up to the grace period, then end
    /// them as aborted), journal and flush every debit, close the ports.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.ledger.set_draining();
        self.health
            .set_service_status(HEALTH_SERVICE, tonic_health::ServingStatus::NotServing)
            .await;
        let _ = self.stop_grpc.send(true);
        let mut grpc = self.grpc;
        match tokio::time::timeout(self.grace, &mut grpc).await {
            Ok(r) => r.context("gRPC server thread")?.context("gRPC server")?,
            Err(_) => {
                tracing::warn!(
                    open_streams = self.extproc.active_streams(),
                    "grace period over with streams still open; ending them as aborted"
                );
                self.extproc.abort_all();
                let ext = self.extproc.clone();
                let settled = tokio::time::timeout(Duration::from_secs(5), async {
                    while ext.active_streams() > 0 {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                })
                .await;
                if settled.is_err() {
                    tracing::error!(open_streams = ext.active_streams(), "streams did not end");
                }
                if tokio::time::timeout(Duration::from_secs(2), grpc)
                    .await
                    .is_err()
                {
                    tracing::warn!("the gRPC server did not stop; leaving it to the exit");
                }
            }
        }
        // Everything settled is now pending or journaled: write the journal out, then the store.
        self.ledger.stop_journaling();
        let journal = match self.journal {
            Some(h) => tokio::task::spawn_blocking(move || h.join())
                .await
                .context("journal thread")?
                .ok(),
            None => None,
        };
        let _ = self.stop_writer.send(true);
        self.writer.await.context("writer task")?;
        if let Some(mut j) = journal {
            j.flushed(self.ledger.flushed_seq());
        }
        // Debits are written (their leases shrank with them): give back what is left.
        let _ = self.stop_lease.send(true);
        if let Some(t) = self.lease_task {
            let _ = tokio::time::timeout(Duration::from_secs(3), t).await;
        }
        if let Some(l) = self.listener {
            l.abort();
        }
        self.quota_sweeper.abort();
        let _ = self.stop_admin.send(true);
        self.admin
            .await
            .context("admin task")?
            .context("admin server")?;
        tracing::info!(queued = self.ledger.queue_depth(), "tokenbudget stopped");
        Ok(())
    }
}
