//! The `tokenbudget` binary: parses the command line, loads the config, hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokenbudget::cli::{self, BudgetCmd, CheckArgs, GroupCmd, PriceCmd, UsageCmd};
use tokenbudget::clock::{SharedClock, SystemClock};
use tokenbudget::config::{Config, LogFormat};

/// Exit code for an invalid configuration (EX_USAGE).
const EXIT_BAD_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "tokenbudget",
    version,
    about = "LLM token and dollar budgets, enforced behind Envoy"
)]
struct Cli {
    /// Config file (TOML). Without one, defaults apply (SQLite store, localhost ports).
    #[arg(long, global = true, env = "TOKENBUDGET_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the ext_proc server and the admin port.
    Serve,
    /// Apply schema migrations to the store.
    Migrate,
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Manage budgets in the store.
    Budgets {
        #[command(subcommand)]
        cmd: BudgetCmd,
    },
    /// Manage the price table (USD per 1M tokens, effective-dated).
    Prices {
        #[command(subcommand)]
        cmd: PriceCmd,
    },
    /// Manage stored group membership.
    Groups {
        #[command(subcommand)]
        cmd: GroupCmd,
    },
    /// Usage reports from the hourly rollups.
    Usage {
        #[command(subcommand)]
        cmd: UsageCmd,
    },
    /// Dry-run a decision: which budgets match, where each stands, which binds, and why.
    Check(CheckArgs),
    /// Admin API tokens.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Make a new random token; prints it once, with the [[admin.tokens]] entry that accepts it.
    New {
        /// Recorded as the actor of every change made with this token.
        #[arg(long)]
        name: String,
        #[arg(long, value_parser = ["admin", "viewer"], default_value = "viewer")]
        role: String,
    },
    /// Print the SHA-256 of a token read from standard input (for a token you made yourself).
    Hash,
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Validate the config file and print the effective settings.
    Check,
    /// Print the reference of every key with its default (Markdown, as in the README).
    Reference,
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Config {
        cmd: ConfigCmd::Reference,
    } = cli.command
    {
        print!("{}", tokenbudget::config::reference::markdown());
        return ExitCode::SUCCESS;
    }
    let config = match Config::load(cli.config.as_deref(), &|k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tokenbudget: invalid configuration: {e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    if let Command::Config {
        cmd: ConfigCmd::Check,
    } = cli.command
    {
        println!("configuration is valid");
        println!("  grpc_listen  {}", config.grpc_listen);
        println!("  admin_listen {}", config.admin_listen);
        println!(
            "  store        {}",
            match &config.store {
                tokenbudget::store::StoreTarget::Postgres { .. } =>
                    "postgres (database_url set)".to_string(),
                tokenbudget::store::StoreTarget::Sqlite { path } =>
                    format!("sqlite {}", path.display()),
            }
        );
        println!("  timezone     {}", config.timezone);
        return ExitCode::SUCCESS;
    }
    if let Command::Token { cmd } = &cli.command {
        return token(cmd);
    }
    init_logging(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tokenbudget: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let clock: SharedClock = Arc::new(SystemClock);
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve => serve(config, clock).await,
            Command::Migrate => {
                tokenbudget::app::open_store(
                    &Config {
                        migrate_on_start: true,
                        ..config
                    },
                    &clock,
                )
                .await?;
                println!("migrations applied");
                Ok(())
            }
            Command::Budgets { cmd } => cli::budgets(&config, &clock, cmd).await,
            Command::Usage { cmd } => cli::usage(&config, &clock, cmd).await,
            Command::Prices { cmd } => cli::prices(&config, &clock, cmd).await,
            Command::Groups { cmd } => cli::groups(&config, &clock, cmd).await,
            Command::Check(args) => cli::check(&config, &clock, args).await,
            Command::Config { .. } | Command::Token { .. } => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tokenbudget: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn token(cmd: &TokenCmd) -> ExitCode {
    use tokenbudget::admin::auth;
    match cmd {
        TokenCmd::New { name, role } => {
            let (token, digest) = auth::new_token();
            println!("token (shown once; give it to the {role}):\n  {token}\n");
            println!(
                "config entry:\n[[admin.tokens]]\nname = {name:?}\nrole = {role:?}\nsha256 = \"{digest}\""
            );
        }
        TokenCmd::Hash => {
            let mut line = String::new();
            if std::io::stdin().read_line(&mut line).is_err() || line.trim().is_empty() {
                eprintln!("tokenbudget: expected a token on standard input");
                return ExitCode::FAILURE;
            }
            println!("{}", hex::encode(auth::sha256(line.trim())));
        }
    }
    ExitCode::SUCCESS
}

async fn serve(config: Config, clock: SharedClock) -> anyhow::Result<()> {
    let running = tokenbudget::app::start(config, clock).await?;
    wait_for_signal().await;
    tracing::info!("shutting down: draining streams, then flushing debits");
    running.shutdown().await
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = ctrl_c.await;
}
