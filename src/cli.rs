//! The command line (clap derive). Every broker option also reads an `OP_BRIDGE_*`
//! environment variable so a Dockerfile can set it.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::{PossibleValue, TypedValueParser};
use clap::{Args, Parser, Subcommand, ValueEnum};

/// clap's own boolish parser (yes/no, on/off, true/false, 1/0, y/n, t/f, any case), with a
/// `--help` that says so: clap's lists only `true, false`. Same name, so every boolean
/// option uses it.
#[derive(Clone, Copy, Debug)]
pub struct BoolishValueParser;

impl BoolishValueParser {
    pub fn new() -> BoolishValueParser {
        BoolishValueParser
    }
}

impl Default for BoolishValueParser {
    fn default() -> Self {
        BoolishValueParser
    }
}

impl TypedValueParser for BoolishValueParser {
    type Value = bool;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<bool, clap::Error> {
        clap::builder::BoolishValueParser::new().parse_ref(cmd, arg, value)
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        Some(Box::new(["yes", "no", "on", "off", "true", "false"].into_iter().map(PossibleValue::new)))
    }
}

use crate::supervise::privsep::check_user_spec;

/// The last-resort socket path (see [`crate::socket_path`] for the default).
pub const DEFAULT_SOCKET: &str = crate::socket_path::LAST_RESORT;

#[derive(Debug, Parser)]
#[command(name = "op-bridge", version, about = "1Password secret broker and container init for AI agents")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Resolve secrets, serve them, and supervise CMD as the container's init.
    Run(RunArgs),
    /// Resolve secrets and serve them on the socket (no child).
    Daemon(DaemonArgs),
    /// Print a secret's value (no trailing newline); without NAME, answer an OpenClaw
    /// exec-provider request read from stdin.
    Get(GetArgs),
    /// Store a value in 1Password and in the broker (value from stdin when omitted or '-').
    Set(SetArgs),
    /// Forget a secret in the broker's memory (1Password is not touched).
    Delete(NameArgs),
    /// List the names the broker holds.
    List(ClientArgs),
    /// Check that the broker answers.
    Ping(ClientArgs),
    /// Ask the broker to re-resolve every secret.
    Refresh(RefreshArgs),
    /// Show the broker's state (names, ages, staleness; never values).
    Status(StatusArgs),
    /// Print the environment that points a process at the egress proxy (for `daemon`
    /// users: `eval "$(op-bridge proxy-env)"` before starting the application).
    ProxyEnv(StatusArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Socket of the broker (default: $XDG_RUNTIME_DIR/op-bridge.sock, else
    /// /run/op-bridge/op-bridge.sock, else /tmp/op-bridge.sock).
    #[arg(long, env = "OP_BRIDGE_SOCKET", default_value_os_t = crate::socket_path::default_for_client())]
    pub socket: PathBuf,
    /// How long to wait for the broker's answer [default: 10s; 4s for the exec provider
    /// (`get` without NAME), so that it answers within OpenClaw's 5 s].
    #[arg(long, env = "OP_BRIDGE_CLIENT_TIMEOUT", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Also trust a server running as this uid (root and the client's own uid always are);
    /// any other server is refused before a byte is sent.
    #[arg(long, env = "OP_BRIDGE_SERVER_UID", value_name = "UID")]
    pub server_uid: Option<u32>,
}

/// A client's default `--timeout`.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

impl ClientArgs {
    /// `--timeout`, else [`CLIENT_TIMEOUT`].
    pub fn timeout(&self) -> Duration {
        self.timeout.unwrap_or(CLIENT_TIMEOUT)
    }
}

#[derive(Debug, Args)]
pub struct GetArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Secret name or op:// reference. Omit it to speak OpenClaw's exec-provider protocol.
    pub name: Option<String>,
}

#[derive(Debug, Args)]
pub struct SetArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    pub name: String,
    /// An op:// reference (default: the one registered for NAME), then the value. A second
    /// argument that does not start with op:// is the value. Prefer stdin: argv is visible.
    #[arg(num_args = 0..=2, value_names = ["URI", "VALUE"])]
    pub rest: Vec<String>,
}

#[derive(Debug, Args)]
pub struct NameArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    pub name: String,
}

#[derive(Debug, Args)]
pub struct RefreshArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Fallback when the socket is unreachable: send SIGHUP to the pid in this file.
    #[arg(long, env = "OP_BRIDGE_PID_FILE")]
    pub pid_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Print the raw JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// Socket to serve on (default: $XDG_RUNTIME_DIR/op-bridge.sock, else
    /// /run/op-bridge/op-bridge.sock, else /tmp/op-bridge.sock when /run is not writable).
    #[arg(long, env = "OP_BRIDGE_SOCKET", default_value_os_t = crate::socket_path::default_for_server())]
    pub socket: PathBuf,
    /// Reference discovery: variables named {prefix}NAME{suffix} holding op://… become NAME.
    #[arg(long, env = "OP_BRIDGE_PREFIX", default_value = "OP_")]
    pub prefix: String,
    #[arg(long, env = "OP_BRIDGE_SUFFIX", default_value = "_REF")]
    pub suffix: String,
    /// Watch a credential file and write its changes back: PATH=[NAME=]op://vault/item/[section/]field
    /// (repeatable; in the environment, comma-separated).
    #[arg(long = "watch", env = "OP_BRIDGE_WATCH", value_delimiter = ',', value_name = "SPEC")]
    pub watch: Vec<String>,
    /// Where secrets come from: `op` (the 1Password CLI), `connect` (a 1Password Connect
    /// server: OP_CONNECT_HOST and OP_CONNECT_TOKEN) or `file:PATH` (a JSON vault file).
    /// Default: `connect` when OP_CONNECT_HOST and OP_CONNECT_TOKEN are set, else `op`.
    #[arg(long, env = "OP_BRIDGE_BACKEND")]
    pub backend: Option<String>,
    /// Path of the op CLI (default: found on PATH).
    #[arg(long, env = "OP_BRIDGE_OP_PATH")]
    pub op_path: Option<PathBuf>,
    /// Timeout of one op call (a hung op is killed) or of one Connect request.
    #[arg(long, env = "OP_BRIDGE_OP_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub op_timeout: Duration,
    /// Most op processes, or Connect requests, running at once.
    #[arg(long, env = "OP_BRIDGE_CONCURRENCY", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub concurrency: u16,
    /// Attempts for an op call or Connect read that fails transiently (network, 5xx, 429).
    #[arg(long, env = "OP_BRIDGE_RETRIES", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub retries: u32,
    /// Start even when some secrets cannot be resolved (they are reported and left out).
    #[arg(long, env = "OP_BRIDGE_ALLOW_MISSING", value_parser = BoolishValueParser::new(), default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub allow_missing: bool,
    /// error, warn, info, debug or trace [default: warn for `run`, so nothing lands on the
    /// application's terminal unless something is wrong; info for `daemon`].
    #[arg(long, env = "OP_BRIDGE_LOG_LEVEL")]
    pub log_level: Option<String>,
    #[arg(long, env = "OP_BRIDGE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Append one JSON line per request to this file ('-' for stderr).
    #[arg(long, env = "OP_BRIDGE_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,
    /// Another uid allowed to connect (op-bridge's own uid and root always are). Repeatable.
    #[arg(long = "allow-uid", env = "OP_BRIDGE_ALLOW_UID", value_delimiter = ',', value_name = "UID")]
    pub allow_uid: Vec<u32>,
    /// Refuse SET and DELETE.
    #[arg(long, env = "OP_BRIDGE_READ_ONLY", value_parser = BoolishValueParser::new(), default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub read_only: bool,
    /// Let SET write to any reference, not only the one registered for the name.
    #[arg(long, env = "OP_BRIDGE_ALLOW_SET_ANY", value_parser = BoolishValueParser::new(), default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub allow_set_any: bool,
    /// Let writes create a missing 1Password item (fields are always created).
    #[arg(long, env = "OP_BRIDGE_CREATE_ITEMS", value_parser = BoolishValueParser::new(), default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub create_items: bool,
    /// How long a SET waits for 1Password before answering "accepted, not stored yet" (the
    /// client then exits 75; the value stays queued and is stored when 1Password answers).
    #[arg(long, env = "OP_BRIDGE_SET_WAIT", default_value = "8s", value_parser = parse_duration)]
    pub set_wait: Duration,
    /// Least time between the starts of two SET-driven write cycles of one 1Password item:
    /// SETs that come within it are written together at its end (newest value wins), and a
    /// change captured from a watched file of the item cuts it short.
    #[arg(long, env = "OP_BRIDGE_SET_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub set_interval: Duration,
    /// Write op-bridge's pid here (removed at exit).
    #[arg(long, env = "OP_BRIDGE_PID_FILE")]
    pub pid_file: Option<PathBuf>,
    /// Quiet period after a watched file changes before it is captured.
    #[arg(long, env = "OP_BRIDGE_DEBOUNCE", default_value = "300ms", value_parser = parse_duration)]
    pub debounce: Duration,
    /// Write a missing watched file from 1Password at start (mode 0600).
    #[arg(long, env = "OP_BRIDGE_MATERIALIZE", value_parser = BoolishValueParser::new(), default_value_t = true, num_args = 0..=1, default_missing_value = "true")]
    pub materialize: bool,
    /// Most simultaneous client connections.
    #[arg(long, env = "OP_BRIDGE_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// URL of the 1Password Connect server (http:// or https://); the token is read from
    /// OP_CONNECT_TOKEN only, never from the command line.
    #[arg(long, env = "OP_CONNECT_HOST", value_name = "URL")]
    pub connect_host: Option<String>,
    /// Close a connection idle this long.
    #[arg(long, env = "OP_BRIDGE_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// A request must be complete this long after its first byte.
    #[arg(long, env = "OP_BRIDGE_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// Run `op` as this USER[:GROUP] (names or numbers; default: op-bridge's own uid), so
    /// neither the command nor op-bridge shares a uid with the processes holding the token.
    #[arg(long, env = "OP_BRIDGE_OP_USER", value_name = "USER[:GROUP]", value_parser = check_user_spec)]
    pub op_user: Option<String>,
    /// REFRESH and SIGHUP cause at most one refresh per this interval; one that comes within
    /// it waits for a trailing refresh at the interval's end (the refresh timer is not limited).
    #[arg(long, env = "OP_BRIDGE_REFRESH_MIN_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub refresh_min_interval: Duration,
    /// Bytes in flight across all connections (framed values, long request lines, replies
    /// not yet written); beyond it a frame gets `ERR busy` without being read.
    #[arg(long, env = "OP_BRIDGE_MAX_INFLIGHT_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_inflight_bytes: usize,
    /// Make the audit log blocking (a request waits for its line) instead of lossy.
    #[arg(long, env = "OP_BRIDGE_AUDIT_LOG_STRICT", value_parser = BoolishValueParser::new(), default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub audit_log_strict: bool,
    /// Sealed restart cache and write-back journal (needs OP_SERVICE_ACCOUNT_TOKEN or
    /// OP_CONNECT_TOKEN: the key is derived from it).
    #[arg(long, env = "OP_BRIDGE_CACHE")]
    pub cache: Option<PathBuf>,
    /// A cache younger than this is used at start with no 1Password call.
    #[arg(long, env = "OP_BRIDGE_CACHE_FRESH", default_value = "10m", value_parser = parse_duration)]
    pub cache_fresh: Duration,
    /// An older cache is used only while 1Password is unavailable, and not past this age.
    #[arg(long, env = "OP_BRIDGE_CACHE_MAX_STALE", default_value = "24h", value_parser = parse_duration)]
    pub cache_max_stale: Duration,
    /// Re-resolve every secret this often (± 10% jitter); 0 or unset: never.
    #[arg(long, env = "OP_BRIDGE_REFRESH_INTERVAL", value_parser = parse_duration)]
    pub refresh_interval: Option<Duration>,
    /// Reads per hour the token may spend (1000 on Teams); a refresh interval that would
    /// exceed it is warned about at start.
    #[arg(long, env = "OP_BRIDGE_READ_BUDGET", default_value_t = 1000)]
    pub read_budget: u64,
    /// Bind secret NAME to the hosts it may be sent to: NAME=host[:port][,*.example.com…]
    /// (repeatable; in the environment, ';'-separated). {prefix}NAME_HOSTS variables bind too.
    /// A bound secret is given out only as its placeholder; the proxy swaps in the value.
    #[arg(long = "bind", env = "OP_BRIDGE_BIND", value_delimiter = ';', value_name = "NAME=HOSTS")]
    pub bind: Vec<String>,
    /// Give bound secret NAME out raw (GET, exec provider, --export), each read audited.
    #[arg(long = "allow-raw", env = "OP_BRIDGE_ALLOW_RAW", value_delimiter = ',', value_name = "NAME")]
    pub allow_raw: Vec<String>,
    /// A fixed prefix for NAME's placeholder, for tools that check a key's shape (e.g.
    /// ANTHROPIC_KEY=sk-ant-). Repeatable.
    #[arg(
        long = "placeholder-prefix",
        env = "OP_BRIDGE_PLACEHOLDER_PREFIX",
        value_delimiter = ',',
        value_name = "NAME=PREFIX"
    )]
    pub placeholder_prefix: Vec<String>,
    /// Serve the egress proxy on this loopback address (e.g. 127.0.0.1:8118; port 0 picks one).
    #[arg(long, env = "OP_BRIDGE_PROXY", value_name = "ADDR")]
    pub proxy: Option<std::net::SocketAddr>,
    /// Serve http://PROXY/NAME/… as URL/… for clients configured by base URL (repeatable):
    /// NAME=https://upstream[/base].
    #[arg(long = "route", env = "OP_BRIDGE_ROUTE", value_delimiter = ',', value_name = "NAME=URL")]
    pub route: Vec<String>,
    /// CONNECT to hosts with no binding: tunnel them untouched (all) or refuse them (bound-only).
    #[arg(long, env = "OP_BRIDGE_EGRESS", value_enum, default_value_t = Egress::All)]
    pub egress: Egress,
    /// Let the proxy connect to loopback, private, link-local, CGNAT and metadata addresses.
    #[arg(long, env = "OP_BRIDGE_PROXY_ALLOW_PRIVATE", value_parser = BoolishValueParser::new(), default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub proxy_allow_private: bool,
    /// Where to write the proxy's CA certificate with the system roots (a PEM bundle for the
    /// child's SSL_CERT_FILE) [default: op-bridge-proxy-ca.pem next to the socket].
    #[arg(long, env = "OP_BRIDGE_PROXY_CA_BUNDLE", value_name = "PATH")]
    pub proxy_ca_bundle: Option<PathBuf>,
    /// Most simultaneous proxy connections.
    #[arg(long, env = "OP_BRIDGE_PROXY_MAX_CONNECTIONS", default_value_t = 256)]
    pub proxy_max_connections: usize,
    /// Close a proxy connection that waits this long for its next request.
    #[arg(long, env = "OP_BRIDGE_PROXY_IDLE_TIMEOUT", default_value = "90s", value_parser = parse_duration)]
    pub proxy_idle_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Egress {
    /// Tunnel CONNECTs to hosts with no binding untouched.
    All,
    /// Refuse CONNECTs to hosts with no binding.
    BoundOnly,
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// At shutdown, how long pending write-backs may take to reach 1Password.
    #[arg(long, env = "OP_BRIDGE_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub grace: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HupMode {
    /// Re-resolve every secret (what `docker kill -s HUP` means to op-bridge users).
    Refresh,
    /// Forward SIGHUP to the child.
    Forward,
    Both,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Put secret NAME in the child's environment as VAR (default NAME). Repeatable.
    #[arg(long = "export", env = "OP_BRIDGE_EXPORT", value_delimiter = ',', value_name = "NAME[=VAR]")]
    pub export: Vec<String>,
    /// Put every secret in the child's environment under its name.
    #[arg(long, env = "OP_BRIDGE_EXPORT_ALL", value_parser = BoolishValueParser::new(), default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub export_all: bool,
    /// Leave OP_SERVICE_ACCOUNT_TOKEN, OP_CONNECT_TOKEN, OP_SESSION_* and the OP_*_REF
    /// variables in the child's environment.
    #[arg(long, env = "OP_BRIDGE_KEEP_TOKEN", value_parser = BoolishValueParser::new(), default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub keep_token: bool,
    /// Time between the stop signal and SIGKILL; also bounds the final write-back flush.
    #[arg(long, env = "OP_BRIDGE_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub grace: Duration,
    /// What a refresh that changes an exported value does to the child: none, restart or
    /// signal:SIG (e.g. signal:USR1).
    #[arg(long, env = "OP_BRIDGE_ON_CHANGE", default_value = "none")]
    pub on_change: String,
    /// SIGHUP: refresh secrets, forward to the child, or both.
    #[arg(long, env = "OP_BRIDGE_HUP", value_enum, default_value_t = HupMode::Refresh)]
    pub hup: HupMode,
    /// Run the command as USER[:GROUP] (names or numbers; supplementary groups from
    /// /etc/group, HOME from /etc/passwd) while op-bridge stays root; the socket is handed
    /// to that user.
    #[arg(long, env = "OP_BRIDGE_USER", value_name = "USER[:GROUP]", value_parser = check_user_spec)]
    pub user: Option<String>,
    /// With --user: let the command gain privileges again through setuid binaries and file
    /// capabilities. By default it runs with no_new_privs and an empty capability bounding set.
    #[arg(long, env = "OP_BRIDGE_ALLOW_PRIVILEGE_GAIN", value_parser = BoolishValueParser::new(), default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub allow_privilege_gain: bool,
    /// The command to supervise.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

/// Longest duration any option accepts: 100 years.
const MAX_DURATION_SECS: f64 = 100.0 * 365.25 * 86_400.0;

/// Parses `500ms`, `10s`, `2m`, `1h` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().map_err(|_| format!("invalid duration '{text}' (e.g. 500ms, 10s, 2m)"))?;
    let seconds = match unit.trim() {
        "ms" => number / 1000.0,
        "" | "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return Err(format!("invalid duration unit in '{text}' (use ms, s, m or h)")),
    };
    // Bounded so that `now + duration` can never overflow (a panic would abort PID 1).
    if !(0.0..=MAX_DURATION_SECS).contains(&seconds) {
        return Err(format!("duration '{text}' is out of range (at most 100 years)"));
    }
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("duration '{text}' is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5d").is_err());
        // `now + grace` must never overflow.
        assert!(parse_duration("10000000000000000000").is_err());
        assert!(parse_duration("1000000h").is_err());
    }
}
