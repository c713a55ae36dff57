//! The translation of the broker options (`daemon` and `run`) into a [`BrokerConfig`]: backend
//! choice (including Connect when its variables are set), `--op-user`, watch specs, policy
//! and limits. Every path is made absolute here, because `run` moves to `/` once its command
//! has started. Errors are usage errors (exit 2).

use crate::backend::RetryPolicy;
use crate::backend::op::RunAs;
use crate::cli::BrokerArgs;
use crate::daemon::broker::BrokerPolicy;
use crate::daemon::connection::Limits;
use crate::daemon::listener::ServeOptions;
use crate::daemon::{BackendSpec, BrokerConfig};
use crate::supervise::privsep::resolve_user;
use crate::watch::{WatchOptions, WatchSpec};

/// `path` against the current directory (unchanged when that cannot be read).
pub(crate) fn absolute(path: &std::path::Path) -> std::path::PathBuf {
    std::env::current_dir().map(|dir| dir.join(path)).unwrap_or_else(|_| path.to_path_buf())
}

/// Turns the broker options into configuration (errors are usage errors).
pub fn broker_config(args: &BrokerArgs) -> Result<BrokerConfig, String> {
    let connect_env =
        args.connect_host.as_deref().is_some_and(|h| !h.is_empty()) && crate::token::tokens().connect.is_some();
    let chosen = match args.backend.as_deref() {
        Some(backend) => backend,
        None if connect_env => {
            tracing::info!(
                "OP_CONNECT_HOST and OP_CONNECT_TOKEN are set and --backend is not: using 1Password Connect"
            );
            "connect"
        }
        None => "op",
    };
    let backend = match chosen {
        "connect" => BackendSpec::Connect {
            host: args
                .connect_host
                .clone()
                .filter(|h| !h.is_empty())
                .ok_or("--backend connect needs OP_CONNECT_HOST (or --connect-host) and OP_CONNECT_TOKEN (or OP_CONNECT_TOKEN_FILE)")?,
            timeout: args.op_timeout,
            concurrency: usize::from(args.concurrency),
            retry: RetryPolicy { attempts: args.retries, ..RetryPolicy::default() },
        },
        "op" => BackendSpec::Op {
            path: args
                .op_path
                .as_deref()
                .map(|p| if p.components().count() > 1 { absolute(p) } else { p.to_path_buf() }),
            timeout: args.op_timeout,
            concurrency: usize::from(args.concurrency),
            retry: RetryPolicy { attempts: args.retries, ..RetryPolicy::default() },
            user: match &args.op_user {
                // Not root: resolve_user let only op-bridge's own uid through; nothing to switch.
                Some(spec) => resolve_user(spec).map(|u| {
                    (nix::unistd::getuid().is_root() || !u.is_current()).then_some(RunAs {
                        uid: u.uid,
                        gid: u.gid,
                        home: u.home,
                    })
                })?,
                None => None,
            },
        },
        other => match other.strip_prefix("file:") {
            Some(path) if !path.is_empty() => BackendSpec::File(path.into()),
            _ => return Err(format!("unknown backend '{other}' (use 'op', 'connect' or 'file:PATH')")),
        },
    };
    let mut watches = args.watch.iter().map(|spec| WatchSpec::parse(spec)).collect::<Result<Vec<_>, _>>()?;
    // `run` moves to / once the command has started: every path is made absolute first.
    for watch in &mut watches {
        watch.path = absolute(&watch.path);
    }
    let backend = match backend {
        BackendSpec::File(path) => BackendSpec::File(absolute(&path)),
        other => other,
    };
    if args.prefix.is_empty() && args.suffix.is_empty() {
        return Err("--prefix and --suffix cannot both be empty".into());
    }
    let bindings = crate::proxy::bindings::BindingSpec::parse(
        hosts_env(),
        &args.prefix,
        &args.bind,
        &args.allow_raw,
        &args.placeholder_prefix,
    )?;
    let socket = absolute(&args.socket);
    let proxy = match args.proxy {
        Some(addr) => {
            let bundle = match &args.proxy_ca_bundle {
                Some(path) => absolute(path),
                None => socket.with_file_name("op-bridge-proxy-ca.pem"),
            };
            let mut proxy = crate::proxy::ProxyConfig::new(
                addr,
                &args.route,
                args.egress,
                args.proxy_allow_private,
                bundle,
                args.proxy_max_connections,
            )?;
            proxy.idle = args.proxy_idle_timeout.max(std::time::Duration::from_millis(100));
            Some(proxy)
        }
        None if !args.route.is_empty() => return Err("--route needs --proxy".into()),
        None => None,
    };
    Ok(BrokerConfig {
        socket,
        bindings,
        proxy,
        prefix: args.prefix.clone(),
        suffix: args.suffix.clone(),
        backend,
        policy: BrokerPolicy {
            read_only: args.read_only,
            allow_set_any: args.allow_set_any,
            create_items: args.create_items,
            set_wait: args.set_wait,
            set_interval: args.set_interval,
        },
        serve: ServeOptions {
            allow_uids: args.allow_uid.clone(),
            max_connections: args.max_connections.max(1),
            limits: Limits { idle: args.idle_timeout, request: args.request_timeout },
            drain: std::time::Duration::from_secs(2),
            refresh_min_interval: args.refresh_min_interval,
            max_inflight_bytes: args.max_inflight_bytes,
        },
        audit_log: args.audit_log.as_deref().map(|p| if p.as_os_str() == "-" { p.to_path_buf() } else { absolute(p) }),
        audit_log_strict: args.audit_log_strict,
        pid_file: args.pid_file.as_deref().map(absolute),
        allow_missing: args.allow_missing,
        watches,
        watch: WatchOptions { debounce: args.debounce, materialize: args.materialize, owner: None },
        cache: args.cache.clone().map(|path| crate::cache::CacheOptions {
            path,
            fresh: args.cache_fresh,
            max_stale: args.cache_max_stale,
        }),
        refresh_interval: args.refresh_interval,
        read_budget: args.read_budget,
    })
}

/// The environment's `…_HOSTS` variables (binding discovery); other variables are skipped, so
/// no value of another variable is copied.
fn hosts_env() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(k, v)| {
            let k = k.into_string().ok()?;
            k.ends_with("_HOSTS").then_some(())?;
            Some((k, v.into_string().ok()?))
        })
        .collect()
}
