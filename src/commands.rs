//! The client commands (`get`, `set`, `delete`, `list`, `ping`, `refresh`, `status`). The
//! translation of broker options into configuration is [`crate::config`]'s.

use std::io::{Read, Write};

use zeroize::Zeroizing;

use crate::cli::{ClientArgs, RefreshArgs, SetArgs, StatusArgs};
pub use crate::client::CommandError;
use crate::client::{Client, ClientError};
use crate::locked::extend_zeroizing;
use crate::protocol::{MAX_VALUE, Request};

/// Connects, trusting only a server of root, our own uid or `--server-uid`.
pub(crate) async fn connect(args: &ClientArgs) -> Result<Client, CommandError> {
    Ok(Client::connect_trusting(&args.socket, args.timeout(), args.server_uid).await?)
}

/// `get NAME`: the raw value on stdout, byte-exact, no newline added.
pub async fn get(args: &ClientArgs, name: &str) -> Result<(), CommandError> {
    let value = connect(args).await?.get(name).await?;
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(&value)
        .and_then(|()| stdout.flush())
        .map_err(|e| CommandError::Io(format!("cannot write to stdout: {e}")))
}

/// `set NAME [URI] [VALUE]`.
pub async fn set(args: &SetArgs) -> Result<(), CommandError> {
    let (uri, value_arg) = match args.rest.as_slice() {
        [] => (None, None),
        [one] if one.starts_with("op://") => (Some(one.clone()), None),
        [one] => (None, Some(one.as_str())),
        [uri, value] => (Some(uri.clone()), Some(value.as_str())),
        _ => return Err(CommandError::Usage("usage: op-bridge set NAME [URI] [VALUE]".into())),
    };
    let value = match value_arg {
        Some("-") | None => read_stdin_value()?,
        Some(text) => Zeroizing::new(text.as_bytes().to_vec()),
    };
    let name = crate::protocol::normalize_name(&args.name).map_err(|e| CommandError::Usage(e.to_string()))?;
    connect(&args.client).await?.simple(Request::Set { name, uri, value }).await?;
    Ok(())
}

fn read_stdin_value() -> Result<Zeroizing<Vec<u8>>, CommandError> {
    let mut value = Zeroizing::new(Vec::new());
    let mut chunk = Zeroizing::new([0u8; 8192]);
    let mut stdin = std::io::stdin().lock();
    loop {
        match stdin.read(&mut chunk[..]) {
            Ok(0) => break,
            Ok(n) => {
                if value.len() + n > MAX_VALUE {
                    return Err(CommandError::Usage(format!("value on stdin is larger than {MAX_VALUE} bytes")));
                }
                extend_zeroizing(&mut value, &chunk[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(CommandError::Io(format!("cannot read stdin: {e}"))),
        }
    }
    Ok(value)
}

pub async fn delete(args: &ClientArgs, name: &str) -> Result<(), CommandError> {
    let name = crate::protocol::normalize_name(name).map_err(|e| CommandError::Usage(e.to_string()))?;
    connect(args).await?.simple(Request::Delete(name)).await?;
    Ok(())
}

/// `list`: one name per line.
pub async fn list(args: &ClientArgs) -> Result<(), CommandError> {
    let names = connect(args).await?.simple(Request::List).await?;
    for name in names.split(',').filter(|n| !n.is_empty()) {
        println!("{name}");
    }
    Ok(())
}

pub async fn ping(args: &ClientArgs) -> Result<(), CommandError> {
    let answer = connect(args).await?.simple(Request::Ping).await?;
    println!("{answer}");
    Ok(())
}

/// `refresh`: over the socket, or SIGHUP to the pid file's process when the socket is gone.
pub async fn refresh(args: &RefreshArgs) -> Result<(), CommandError> {
    let mut client_args = args.client.clone();
    // A refresh re-reads every secret; give it more time than a GET.
    client_args.timeout = Some(client_args.timeout().max(std::time::Duration::from_secs(120)));
    match connect(&client_args).await {
        Ok(mut client) => {
            let answer = client.simple(Request::Refresh).await?;
            println!("{answer}");
            Ok(())
        }
        Err(CommandError::Client(err @ ClientError::Unreachable { .. })) => {
            let Some(pid_file) = &args.pid_file else { return Err(err.into()) };
            let pid = std::fs::read_to_string(pid_file)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
                .ok_or(CommandError::Client(err))?;
            crate::supervise::send_hangup(pid)
                .map_err(|e| CommandError::Io(format!("cannot signal pid {pid}: {e}")))?;
            println!("sent SIGHUP to {pid}");
            Ok(())
        }
        Err(other) => Err(other),
    }
}

/// `status`: a table, or the JSON object with `--json`.
pub async fn status(args: &StatusArgs) -> Result<(), CommandError> {
    let text = connect(&args.client).await?.simple(Request::Status).await?;
    if args.json {
        println!("{text}");
        return Ok(());
    }
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| CommandError::Io(format!("STATUS is not JSON: {e}")))?;
    println!(
        "op-bridge {} pid {} backend {} up {}s",
        json["version"].as_str().unwrap_or("?"),
        json["pid"],
        json["backend"].as_str().unwrap_or("?"),
        json["uptime_s"]
    );
    if let Some(line) = backend_status_line(&json["backend_status"]) {
        println!("{line}");
    }
    println!("{:<32} {:<8} {:>8}  REFERENCE / ERROR", "NAME", "STATE", "AGE(s)");
    for secret in json["secrets"].as_array().into_iter().flatten() {
        let detail = secret["error"].as_str().or(secret["ref"].as_str()).unwrap_or("");
        println!(
            "{:<32} {:<8} {:>8}  {}",
            secret["name"].as_str().unwrap_or("?"),
            secret["state"].as_str().unwrap_or("?"),
            secret["age_s"].as_u64().map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
            detail
        );
    }
    for binding in json["bindings"].as_array().into_iter().flatten() {
        let hosts: Vec<&str> = binding["hosts"].as_array().into_iter().flatten().filter_map(|h| h.as_str()).collect();
        let raw = if binding["allow_raw"] == true { " (raw reads allowed)" } else { "" };
        println!("bound: {} -> {}{raw}", binding["name"].as_str().unwrap_or("?"), hosts.join(","));
    }
    print_writebacks(&json["writeback"]);
    Ok(())
}

/// `proxy-env`: `export VAR='value'` lines for a shell's `eval`, or the JSON object.
pub async fn proxy_env(args: &StatusArgs) -> Result<(), CommandError> {
    let text = zeroize::Zeroizing::new(connect(&args.client).await?.simple(Request::ProxyEnv).await?);
    if args.json {
        println!("{}", text.as_str());
        return Ok(());
    }
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| CommandError::Io(format!("PROXYENV is not JSON: {e}")))?;
    for (var, value) in json.as_object().into_iter().flatten() {
        // Single quotes: nothing in the value is expanded by the shell.
        let value = value.as_str().unwrap_or("").replace('\'', "'\\''");
        println!("export {var}='{value}'");
    }
    Ok(())
}

/// The write-back part of `status`: counts, then every target that is pending or failing
/// (a healthy, idle target is not news). Never a value: STATUS carries none.
fn print_writebacks(writeback: &serde_json::Value) {
    let Some(targets) = writeback["targets"].as_array() else { return };
    let failing_of = |t: &serde_json::Value| {
        t["failing"].as_bool().unwrap_or_else(|| t["failed_attempts"].as_u64().unwrap_or(0) > 0)
    };
    let pending_of = |t: &serde_json::Value| t["pending"] == true || t["in_flight"] == true;
    println!(
        "write-backs: {} pending, {} failing ({} watched/written targets)",
        writeback["pending"].as_u64().unwrap_or(0),
        writeback["failing"].as_u64().unwrap_or(0),
        targets.len()
    );
    if let Some(n) = writeback["not_journaled"].as_u64().filter(|n| *n > 0) {
        println!("write-backs NOT journaled: {n} (a restart before 1Password stores them loses them)");
    }
    let news: Vec<&serde_json::Value> = targets.iter().filter(|t| pending_of(t) || failing_of(t)).collect();
    if news.is_empty() {
        return;
    }
    println!("{:<32} {:<8} {:>8}  REFERENCE / LAST ERROR", "WRITE-BACK", "STATE", "ATTEMPTS");
    for target in news {
        let state = match (failing_of(target), target["in_flight"] == true) {
            (true, _) => "failing",
            (false, true) => "writing",
            (false, false) => "pending",
        };
        let reference = target["ref"].as_str().unwrap_or("?");
        let mut detail = match target["last_error"].as_str() {
            Some(error) => format!("{reference}: {error}"),
            None => reference.to_string(),
        };
        if let Some(why) = target["not_journaled"].as_str() {
            detail.push_str(&format!(" (NOT journaled: {why})"));
        }
        println!(
            "{:<32} {:<8} {:>8}  {}",
            target["name"].as_str().unwrap_or("?"),
            state,
            target["failed_attempts"].as_u64().unwrap_or(0),
            detail
        );
    }
}

/// The backend's own STATUS facts as one line, e.g. `connect https://c:8080: 1Password Connect
/// API 1.7.1, sync ACTIVE, sqlite ACTIVE` (None when the backend reports nothing).
fn backend_status_line(status: &serde_json::Value) -> Option<String> {
    let kind = status["kind"].as_str()?;
    let host = status["host"].as_str().unwrap_or("?");
    let health = &status["health"];
    let detail = match health["error"].as_str() {
        Some(error) => format!("unreachable ({error})"),
        None => {
            let mut parts = vec![format!(
                "{} {}",
                health["name"].as_str().unwrap_or("server"),
                health["version"].as_str().unwrap_or("?")
            )];
            for dep in health["dependencies"].as_array().into_iter().flatten() {
                parts.push(format!(
                    "{} {}",
                    dep["service"].as_str().unwrap_or("?"),
                    dep["status"].as_str().unwrap_or("?")
                ));
            }
            parts.join(", ")
        }
    };
    Some(format!("{kind} {host}: health {detail}"))
}
