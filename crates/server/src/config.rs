//! Configuration: command-line flags, then `PAYRAIL_*` environment variables,
//! then the config file, then defaults.
//!
//! Secrets (the admin token, the master key) are read from the environment or
//! the file only, never from flags, which other users can see in `ps`.

use std::path::{Path, PathBuf};

use payrail_mobikwik::MobikwikConfig;
use payrail_store::{Location, MasterKey};
use secrecy::SecretString;
use serde::Deserialize;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_DB: &str = "sqlite://payrail.db";
/// The admin token in sandbox mode when none is configured. Public by design.
pub const SANDBOX_ADMIN_TOKEN: &str = "sandbox-admin-token";

/// `payrail serve` flags. Each falls back to its environment variable.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:8080]
    #[arg(long, env = "PAYRAIL_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// Database URL: sqlite://PATH or postgres://… [default: sqlite://payrail.db]
    #[arg(long, env = "PAYRAIL_DB", value_name = "URL", hide_env_values = true)]
    pub db: Option<String>,
    /// Sandbox mode: load fixtures, enable the sandbox admin endpoints.
    /// `--sandbox=false` (or `PAYRAIL_SANDBOX=false`) overrides the file.
    #[arg(
        long,
        env = "PAYRAIL_SANDBOX",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new(),
    )]
    pub sandbox: Option<bool>,
    /// TOML config file (see README for the keys).
    #[arg(long, env = "PAYRAIL_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// The config file. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub db: Option<String>,
    pub sandbox: Option<bool>,
    #[serde(default, deserialize_with = "secret")]
    pub admin_token: Option<String>,
    #[serde(default, deserialize_with = "secret")]
    pub master_key: Option<String>,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub postgres: PostgresConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub mobikwik: MobikwikConfig,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Most units of work one commit may carry.
    pub max_batch: usize,
    /// Reader connections.
    pub readers: usize,
    /// Hours a sent message (an OTP's SMS) is kept before it is pruned.
    pub outbox_retention_hours: u32,
    /// Milliseconds a request's work may wait for the writer or a reader
    /// before it is refused, having done nothing.
    pub max_wait_ms: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            max_batch: 1024,
            readers: 8,
            outbox_retention_hours: 24,
            max_wait_ms: payrail_store::DEFAULT_MAX_WAIT.as_millis() as u64,
        }
    }
}

/// A secret's key in the file. Any other type is refused without its value:
/// serde's own message would quote it (``invalid type: integer `…` ``), and
/// the message is printed.
fn secret<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match toml::Value::deserialize(d)? {
        toml::Value::String(s) => Ok(Some(s)),
        other => Err(serde::de::Error::custom(format!(
            "admin_token and master_key must be quoted strings, not a {} (its value is not shown)",
            other.type_str()
        ))),
    }
}

/// `[postgres]`: only used with a `postgres://` database. Each node holds
/// `writers + store.readers` connections.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// Writer connections (each runs its own group commits).
    pub writers: usize,
    /// Most units of work in one PostgreSQL commit.
    pub max_batch: usize,
    /// Statement timeout, milliseconds.
    pub statement_timeout_ms: u64,
    /// Connect timeout, milliseconds.
    pub connect_timeout_ms: u64,
    /// Longest wait for a row lock before a unit is retried, milliseconds.
    pub lock_timeout_ms: u64,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        let d = payrail_store::PgTuning::default();
        PostgresConfig {
            writers: d.writers,
            max_batch: d.max_batch,
            statement_timeout_ms: d.statement_timeout.as_millis() as u64,
            connect_timeout_ms: d.connect_timeout.as_millis() as u64,
            lock_timeout_ms: d.lock_timeout.as_millis() as u64,
        }
    }
}

impl PostgresConfig {
    pub fn tuning(&self) -> payrail_store::PgTuning {
        use std::time::Duration;
        payrail_store::PgTuning {
            writers: self.writers.max(1),
            max_batch: self.max_batch.max(1),
            connect_timeout: Duration::from_millis(self.connect_timeout_ms.max(1)),
            statement_timeout: Duration::from_millis(self.statement_timeout_ms.max(1)),
            lock_timeout: Duration::from_millis(self.lock_timeout_ms.max(1)),
        }
    }
}

/// Bounds on what a client may send.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request body, bytes; larger is 413 (see `http::guard_body`).
    pub max_body_bytes: usize,
    /// Largest request head (request line and headers), bytes; larger is 431.
    pub max_header_bytes: usize,
    /// Seconds a request's whole body may take to arrive; slower is 400 and
    /// the connection is closed.
    pub body_timeout_secs: u64,
    /// Seconds a write of an answer may stay blocked (the client not reading
    /// and the socket's buffer full); past that the connection is closed.
    pub write_timeout_secs: u64,
    /// Open connections at most; more wait to be accepted.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 64 * 1024,
            max_header_bytes: 16 * 1024,
            body_timeout_secs: 30,
            write_timeout_secs: 30,
            max_connections: 10_000,
        }
    }
}

/// The resolved configuration.
#[derive(Debug)]
pub struct Config {
    pub listen: String,
    pub db: Location,
    pub sandbox: bool,
    /// `None` only outside sandbox mode, where the server then refuses to start.
    pub admin_token: Option<SecretString>,
    /// The admin token is the public sandbox default.
    pub admin_token_is_sandbox_default: bool,
    pub master_key: Option<MasterKey>,
    pub store: StoreConfig,
    pub postgres: PostgresConfig,
    pub limits: Limits,
    pub mobikwik: MobikwikConfig,
}

/// Something wrong with the configuration; the server does not start.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl Config {
    /// Resolves flags, environment, file and defaults.
    pub fn resolve(args: &ServeArgs) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => load_file(path)?,
            None => FileConfig::default(),
        };
        let sandbox = args.sandbox.or(file.sandbox).unwrap_or(false);
        let db_url = args
            .db
            .clone()
            .or(file.db)
            .unwrap_or_else(|| DEFAULT_DB.to_string());
        let db = Location::parse(&db_url).map_err(ConfigError::Invalid)?;
        // A token of spaces is no token, wherever it is set: the presented
        // one is trimmed.
        let set = |t: &String| !t.trim().is_empty();
        let configured_token = env("PAYRAIL_ADMIN_TOKEN")
            .filter(set)
            .or(file.admin_token.filter(set));
        if configured_token.as_ref().is_some_and(|t| t.trim() != t) {
            return Err(ConfigError::Invalid(
                "the admin token must not begin or end with whitespace".into(),
            ));
        }
        // What a header value can carry as text (`HeaderValue::to_str`): any
        // other token could never be presented, and the admin API would be
        // shut for good while the server looked healthy.
        if configured_token
            .as_ref()
            .is_some_and(|t| !t.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b)))
        {
            return Err(ConfigError::Invalid(
                "the admin token must be printable ASCII: no other character can be sent in a header".into(),
            ));
        }
        let admin_token_is_sandbox_default = sandbox && configured_token.is_none();
        let admin_token = configured_token
            .or_else(|| sandbox.then(|| SANDBOX_ADMIN_TOKEN.to_string()))
            .map(SecretString::from);
        let l = &file.limits;
        // A deadline is the clock plus the timeout: past a day it could overflow.
        let timeouts = 1..=86_400;
        if !timeouts.contains(&l.body_timeout_secs)
            || !timeouts.contains(&l.write_timeout_secs)
            || l.max_connections == 0
        {
            return Err(ConfigError::Invalid(
                "limits.body_timeout_secs and limits.write_timeout_secs must be 1 to 86400, \
                 limits.max_connections at least 1"
                    .into(),
            ));
        }
        file.mobikwik.validate().map_err(ConfigError::Invalid)?;
        if file.store.outbox_retention_hours == 0 {
            return Err(ConfigError::Invalid(
                "store.outbox_retention_hours must be at least 1".into(),
            ));
        }
        // Below a few batches' time, ordinary work would be refused.
        if !(100..=3_600_000).contains(&file.store.max_wait_ms) {
            return Err(ConfigError::Invalid(
                "store.max_wait_ms must be 100 to 3600000".into(),
            ));
        }
        let master_key = match env("PAYRAIL_MASTER_KEY").or(file.master_key) {
            Some(hex) => Some(MasterKey::from_hex(&hex).ok_or_else(|| {
                ConfigError::Invalid(
                    "the master key must be 64 hexadecimal characters (32 bytes)".into(),
                )
            })?),
            None => None,
        };
        Ok(Config {
            listen: args
                .listen
                .clone()
                .or(file.listen)
                .unwrap_or_else(|| DEFAULT_LISTEN.to_string()),
            db,
            sandbox,
            admin_token,
            admin_token_is_sandbox_default,
            master_key,
            store: file.store,
            postgres: file.postgres,
            limits: file.limits,
            mobikwik: file.mobikwik,
        })
    }
}

fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    // The message and its line only: the error's own display quotes the
    // line, which may hold a secret.
    toml::from_str(&text).map_err(|e| {
        let line = e.span().map(|span| {
            1 + text
                .bytes()
                .take(span.start)
                .filter(|&b| b == b'\n')
                .count()
        });
        ConfigError::Parse {
            path: path.to_path_buf(),
            message: match line {
                Some(line) => format!("line {line}: {}", e.message()),
                None => e.message().to_string(),
            },
        }
    })
}
