//! The `entrepot` command line: `entrepot serve` runs a broker node (see the library
//! crate docs in `lib.rs` for what the node is made of).

#![deny(clippy::unwrap_used)]

use entrepot::{config, server};

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::sync::watch;

use crate::config::BrokerConfig;

#[derive(Parser)]
#[command(
    name = "entrepot",
    version,
    about = "Persistent store-and-forward AMQP 1.0 message broker"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a broker node.
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// AMQP listen address [default: 0.0.0.0:5672]
    #[arg(long, env = "ENTREPOT_LISTEN")]
    listen: Option<SocketAddr>,
    /// Directory of the message store [default: ./data]
    #[arg(long, env = "ENTREPOT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// HTTP address for /metrics, /healthz, /readyz [default: 0.0.0.0:8080]
    #[arg(long, env = "ENTREPOT_HTTP")]
    http: Option<SocketAddr>,
    /// YAML configuration file; flags and ENTREPOT_* variables override it.
    #[arg(long, env = "ENTREPOT_CONFIG")]
    config: Option<PathBuf>,
    /// Durability: always | never | interval:<ms> [default: always]
    #[arg(long, env = "ENTREPOT_SYNC")]
    sync: Option<String>,
    /// Create queues on first use [default: true]
    #[arg(long, env = "ENTREPOT_AUTO_CREATE")]
    auto_create: Option<bool>,
    /// Largest message in bytes [default: 104857600]
    #[arg(long, env = "ENTREPOT_MAX_MESSAGE_BYTES")]
    max_message_bytes: Option<u64>,
    /// Failed deliveries before dead-lettering [default: 10]
    #[arg(long, env = "ENTREPOT_MAX_DELIVERY_ATTEMPTS")]
    max_delivery_attempts: Option<u32>,
    /// Segment size of the message log in bytes [default: 134217728]
    #[arg(long, env = "ENTREPOT_SEGMENT_BYTES")]
    segment_bytes: Option<u64>,
    /// Allow SASL ANONYMOUS and plain AMQP connections [default: true]
    #[arg(long, env = "ENTREPOT_ALLOW_ANONYMOUS")]
    allow_anonymous: Option<bool>,
}

impl ServeArgs {
    fn into_config(self) -> anyhow::Result<BrokerConfig> {
        let mut c = match &self.config {
            Some(path) => BrokerConfig::from_file(path).map_err(anyhow::Error::msg)?,
            None => BrokerConfig::default(),
        };
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = self.$field { c.$field = v; } )* };
        }
        set!(
            listen,
            data_dir,
            http,
            sync,
            auto_create,
            max_message_bytes,
            max_delivery_attempts,
            segment_bytes,
            allow_anonymous
        );
        c.validate().map_err(anyhow::Error::msg)?;
        Ok(c)
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting runtime")?;
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args.into_config()?)),
    }
}

async fn serve(config: BrokerConfig) -> anyhow::Result<()> {
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let node = server::Node::start(config, shutdown_rx).await?;
    wait_for_signal().await;
    tracing::info!("shutting down: closing connections, finishing syncs");
    let _ = shutdown_tx.send(true);
    node.stopped().await
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
