//! Batched resolution for the `op` backend: a start or a refresh in as few `op` processes as
//! the cost allows.
//!
//! Cost model: every `op` process of a service account pays a fixed start-up and auth
//! handshake `P` (0.5–1.5 s) before its first read, then `I` per item it reads (≈ 0.1 s). With
//! `n` items split into `k` processes running side by side, a pass takes `P + I·⌈n/k⌉`, so
//! the items are dealt round-robin into `k = min(--concurrency, n)` batches, and each batch is
//! one `op inject` whose template holds every reference of its items. A batch that holds a
//! single reference is an `op read` instead (same cost, and its error names only that
//! reference).
//!
//! The template separates the values with lines made of a random 256-bit hex nonce and an
//! index (`<nonce>:<i>`); `op inject` copies the template byte for byte and puts each raw
//! value in place of its marker, so the values come back byte-exact between known lines. A
//! value that contained the nonce would make the answer ambiguous: that is detected (the nonce
//! must occur exactly once per separator) and those references are read one by one instead.
//!
//! `op inject` fails the whole template on the first bad reference and prints that
//! reference's error. The batch is then narrowed down: an authentication failure applies to
//! every reference (the token is refused, not a reference); another permanent error that
//! quotes exactly one reference of the batch is that reference's own error, and the rest is
//! retried without it; an error that names none is bisected. Transient failures (network,
//! 5xx, 429, timeout) retry the same batch with backoff, honouring a stated 429 delay. When
//! nothing fails, every reference is read exactly once.

use std::collections::BTreeMap;

use zeroize::Zeroizing;

use super::{BackendError, BoxFuture, ErrorKind, Pauses, RetryPolicy, Value};
use crate::reference::SecretRef;

/// What the batching needs from the CLI: one `op` process (`args`, optional stdin) whose
/// stdout is returned or whose failure is classified (`names` blanked out of the error text).
pub(super) trait OpRunner: Send + Sync {
    fn run<'a>(
        &'a self,
        args: &'a [&'a str],
        stdin: Option<&'a [u8]>,
        names: &'a [&'a str],
    ) -> BoxFuture<'a, Result<Value, BackendError>>;
}

/// How a pass may spend processes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Plan<'a> {
    /// Most batches (= `op` processes) in one pass.
    pub concurrency: usize,
    pub retry: RetryPolicy,
    pub pauses: &'a Pauses,
}

type Outcome = Result<Value, BackendError>;

/// Resolves `refs` (one result per input, in order). Duplicate references are read once.
pub(super) async fn resolve(runner: &dyn OpRunner, refs: &[SecretRef], plan: Plan<'_>) -> Vec<Outcome> {
    let mut unique: Vec<&SecretRef> = Vec::new();
    let mut slot_of = Vec::with_capacity(refs.len());
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for r in refs {
        let slot = *seen.entry(r.to_string()).or_insert_with(|| {
            unique.push(r);
            unique.len() - 1
        });
        slot_of.push(slot);
    }
    let mut items: BTreeMap<(&str, &str), Vec<usize>> = BTreeMap::new();
    for (i, r) in unique.iter().enumerate() {
        items.entry(r.item_key()).or_default().push(i);
    }
    let batches = deal(items.into_values().collect(), plan.concurrency);
    let unique = &unique;
    let jobs = batches.into_iter().map(|batch| async move {
        let group: Vec<&SecretRef> = batch.iter().map(|&i| unique[i]).collect();
        let results = resolve_batch(runner, group, plan).await;
        batch.into_iter().zip(results).collect::<Vec<_>>()
    });
    let mut slots: Vec<Option<Outcome>> = unique.iter().map(|_| None).collect();
    for (i, result) in futures_util::future::join_all(jobs).await.into_iter().flatten() {
        slots[i] = Some(result);
    }
    slot_of
        .into_iter()
        .map(|slot| match &slots[slot] {
            Some(Ok(value)) => Ok(value.clone()),
            Some(Err(err)) => Err(err.clone()),
            None => Err(BackendError::new(ErrorKind::Transient, "not resolved")),
        })
        .collect()
}

/// Deals whole items round-robin into at most `concurrency` batches (an item is never split:
/// it would be read by two processes).
fn deal(items: Vec<Vec<usize>>, concurrency: usize) -> Vec<Vec<usize>> {
    let k = concurrency.max(1).min(items.len());
    let mut batches = vec![Vec::new(); k];
    for (n, refs) in items.into_iter().enumerate() {
        batches[n % k].extend(refs);
    }
    batches
}

/// Resolves one batch; narrows it down when it fails.
fn resolve_batch<'a>(
    runner: &'a dyn OpRunner,
    refs: Vec<&'a SecretRef>,
    plan: Plan<'a>,
) -> BoxFuture<'a, Vec<Outcome>> {
    Box::pin(async move {
        if refs.len() == 1 {
            return vec![read_lone(runner, refs[0], plan).await];
        }
        // A reference whose text could end a marker early cannot be templated.
        let (plain, odd): (Vec<usize>, Vec<usize>) = (0..refs.len()).partition(|&i| templatable(refs[i]));
        let mut results: Vec<Option<Outcome>> = refs.iter().map(|_| None).collect();
        let odd_reads = futures_util::future::join_all(odd.iter().map(|&i| read_lone(runner, refs[i], plan)));
        let plain_refs: Vec<&SecretRef> = plain.iter().map(|&i| refs[i]).collect();
        let (odd_results, plain_results) = tokio::join!(odd_reads, inject_narrowing(runner, plain_refs, plan));
        for (i, result) in odd.into_iter().zip(odd_results).chain(plain.into_iter().zip(plain_results)) {
            results[i] = Some(result);
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(BackendError::new(ErrorKind::Transient, "not resolved"))))
            .collect()
    })
}

/// One `op inject` for `refs` (retried while it fails transiently), then narrowing.
async fn inject_narrowing<'a>(runner: &'a dyn OpRunner, refs: Vec<&'a SecretRef>, plan: Plan<'a>) -> Vec<Outcome> {
    match refs.len() {
        0 => return Vec::new(),
        1 => return vec![read_lone(runner, refs[0], plan).await],
        _ => {}
    }
    let err = match inject_retrying(runner, &refs, plan).await {
        Ok(values) => {
            // A value the answer could not delimit is read on its own; those reads run side
            // by side (the runner's semaphore bounds them).
            let reads = refs.iter().zip(values).map(|(r, value)| async move {
                match value {
                    Some(value) => Ok(value),
                    None => read_lone(runner, r, plan).await,
                }
            });
            return futures_util::future::join_all(reads).await;
        }
        Err(err) => err,
    };
    if !err.kind.is_permanent() || err.kind == ErrorKind::Auth {
        // Out of retries, or the token itself is refused: the same answer for every reference.
        return refs.iter().map(|_| Err(err.clone())).collect();
    }
    if let Some(bad) = named_reference(&err, &refs) {
        let rest: Vec<&SecretRef> = refs.iter().enumerate().filter(|&(i, _)| i != bad).map(|(_, r)| *r).collect();
        let mut rest_results = resolve_batch(runner, rest, plan).await.into_iter();
        return (0..refs.len())
            .map(|i| if i == bad { Err(err.clone()) } else { next_or_lost(&mut rest_results) })
            .collect();
    }
    let (left, right) = refs.split_at(refs.len() / 2);
    let (mut a, b) =
        tokio::join!(resolve_batch(runner, left.to_vec(), plan), resolve_batch(runner, right.to_vec(), plan));
    a.extend(b);
    a
}

/// The one reference of `refs` that `err` quotes (`op` names the reference it failed on).
fn named_reference(err: &BackendError, refs: &[&SecretRef]) -> Option<usize> {
    let named: Vec<usize> = (0..refs.len()).filter(|&i| err.message.contains(&format!("'{}'", refs[i]))).collect();
    match named[..] {
        [one] => Some(one),
        _ => None,
    }
}

fn next_or_lost(results: &mut impl Iterator<Item = Outcome>) -> Outcome {
    results.next().unwrap_or_else(|| Err(BackendError::new(ErrorKind::Transient, "not resolved")))
}

/// Runs `op inject` until it succeeds, fails permanently, or runs out of attempts. `Ok`
/// holds one entry per reference: `None` where the answer was ambiguous (read it alone).
async fn inject_retrying(
    runner: &dyn OpRunner,
    refs: &[&SecretRef],
    plan: Plan<'_>,
) -> Result<Vec<Option<Value>>, BackendError> {
    let names: Vec<&str> = refs.iter().flat_map(|r| r.names()).collect();
    let what = format!("op inject of {} references", refs.len());
    plan.retry
        .run(plan.pauses, &what, || async {
            let nonce = nonce();
            let template = template(&nonce, refs);
            crate::meter::READS.add(distinct_items(refs));
            let out = runner.run(&["inject"], Some(&template), &names).await.map_err(|err| {
                // Classified again with only the names of the reference the error is about: the
                // names of a whole batch are many, and blanking them all can hide the wording.
                match named_reference(&err, refs) {
                    Some(bad) => BackendError::new(
                        super::op_errors::classify_text(&err.message, &refs[bad].names()),
                        err.message,
                    ),
                    None => err,
                }
            })?;
            Ok(parse_injected(&out, &nonce, refs.len()))
        })
        .await
}

/// `op read --no-newline` of one reference, retried while it fails transiently.
async fn read_lone(runner: &dyn OpRunner, reference: &SecretRef, plan: Plan<'_>) -> Outcome {
    let uri = reference.to_string();
    let names = reference.names();
    let args = ["read", "--no-newline", &uri];
    plan.retry
        .run(plan.pauses, &uri, || {
            crate::meter::READS.add(1);
            runner.run(&args, None, &names)
        })
        .await
}

fn distinct_items(refs: &[&SecretRef]) -> u64 {
    let items: std::collections::BTreeSet<_> = refs.iter().map(|r| r.item_key()).collect();
    items.len() as u64
}

/// Whether a reference can sit inside a `{{ … }}` marker unchanged.
fn templatable(reference: &SecretRef) -> bool {
    let text = reference.to_string();
    !(text.contains("{{") || text.contains("}}") || text.contains('}') || text.contains(['\n', '\r']))
}

/// 256 random bits as 64 hex digits. Falls back to a weaker source only if the kernel's
/// generator is unavailable: the nonce guards against accidental collisions, and a collision
/// is detected anyway.
fn nonce() -> String {
    let mut bytes = [0u8; 32];
    if getrandom::fill(&mut bytes).is_err() {
        bytes.iter_mut().for_each(|b| *b = fastrand::u8(..));
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `<nonce>:0\n{{ ref0 }}\n<nonce>:1\n{{ ref1 }}\n…<nonce>:end\n`
fn template(nonce: &str, refs: &[&SecretRef]) -> Vec<u8> {
    let mut out = String::new();
    for (i, r) in refs.iter().enumerate() {
        out.push_str(&format!("{nonce}:{i}\n{{{{ {r} }}}}\n"));
    }
    out.push_str(&format!("{nonce}:end\n"));
    out.into_bytes()
}

/// Splits what `op inject` printed for [`template`] back into values. The nonce must occur
/// exactly once per separator; otherwise some value contained it and nothing can be trusted,
/// so every reference is marked for a lone read (`None`).
fn parse_injected(out: &[u8], nonce: &str, count: usize) -> Vec<Option<Value>> {
    let ambiguous = || (0..count).map(|_| None).collect();
    if occurrences(out, nonce.as_bytes()) != count + 1 {
        return ambiguous();
    }
    let first = format!("{nonce}:0\n");
    let Some(mut rest) = out.strip_prefix(first.as_bytes()) else { return ambiguous() };
    let mut values = Vec::with_capacity(count);
    for i in 0..count {
        let next = if i + 1 < count { format!("\n{nonce}:{}\n", i + 1) } else { format!("\n{nonce}:end") };
        let Some(at) = find(rest, next.as_bytes()) else { return ambiguous() };
        values.push(Some(Zeroizing::new(rest[..at].to_vec())));
        rest = &rest[at + next.len()..];
    }
    if !(rest.is_empty() || rest == b"\n") {
        return ambiguous();
    }
    values
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn occurrences(haystack: &[u8], needle: &[u8]) -> usize {
    haystack.windows(needle.len()).filter(|w| *w == needle).count()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;

    /// A scripted `op`: values by reference; `fail` maps a reference to the permanent error
    /// `op` prints for it; `outages` fails that many calls transiently first.
    #[derive(Default)]
    struct FakeRunner {
        values: HashMap<String, Vec<u8>>,
        fail: HashMap<String, (ErrorKind, String)>,
        outages: Mutex<u32>,
        calls: Mutex<Vec<(String, usize)>>,
    }

    impl FakeRunner {
        fn with(values: &[(&str, &str)]) -> FakeRunner {
            FakeRunner {
                values: values.iter().map(|(r, v)| (r.to_string(), v.as_bytes().to_vec())).collect(),
                ..FakeRunner::default()
            }
        }
        fn lookup(&self, r: &str) -> Result<Vec<u8>, BackendError> {
            if let Some((kind, message)) = self.fail.get(r) {
                return Err(BackendError::new(*kind, message.clone()));
            }
            self.values.get(r).cloned().ok_or_else(|| {
                BackendError::new(ErrorKind::NotFound, format!("could not read secret '{r}': isn't an item"))
            })
        }
        fn calls(&self) -> Vec<(String, usize)> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl OpRunner for FakeRunner {
        fn run<'a>(
            &'a self,
            args: &'a [&'a str],
            stdin: Option<&'a [u8]>,
            _names: &'a [&'a str],
        ) -> BoxFuture<'a, Result<Value, BackendError>> {
            Box::pin(async move {
                {
                    let mut outages = self.outages.lock().unwrap();
                    if *outages > 0 {
                        *outages -= 1;
                        self.calls.lock().unwrap().push((args[0].to_string(), 0));
                        return Err(BackendError::new(ErrorKind::Transient, "dial tcp: no such host"));
                    }
                }
                if args[0] == "read" {
                    self.calls.lock().unwrap().push(("read".into(), 1));
                    return self.lookup(args[2]).map(Zeroizing::new);
                }
                // inject: copy the template, replacing `{{ ref }}` markers.
                let template = String::from_utf8(stdin.unwrap().to_vec()).unwrap();
                let mut out = Vec::new();
                let mut rest = template.as_str();
                self.calls.lock().unwrap().push(("inject".into(), template.matches("{{ ").count()));
                while let Some(start) = rest.find("{{ ") {
                    out.extend_from_slice(&rest.as_bytes()[..start]);
                    let end = rest[start..].find(" }}").unwrap() + start;
                    out.extend(self.lookup(&rest[start + 3..end])?);
                    rest = &rest[end + 3..];
                }
                out.extend_from_slice(rest.as_bytes());
                Ok(Zeroizing::new(out))
            })
        }
    }

    fn refs(texts: &[&str]) -> Vec<SecretRef> {
        texts.iter().map(|t| SecretRef::parse(t).unwrap()).collect()
    }

    fn plan(concurrency: usize) -> Plan<'static> {
        Plan {
            concurrency,
            retry: RetryPolicy { attempts: 3, base: Duration::from_millis(1), max: Duration::from_millis(2) },
            pauses: Box::leak(Box::new(Pauses::default())),
        }
    }

    fn run(runner: &FakeRunner, refs: &[SecretRef], concurrency: usize) -> Vec<Outcome> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(resolve(runner, refs, plan(concurrency)))
    }

    #[test]
    fn twenty_items_take_at_most_concurrency_processes_and_come_back_byte_exact() {
        let texts: Vec<String> = (0..20).map(|i| format!("op://v/item{i}/f")).collect();
        let values: Vec<String> = (0..20).map(|i| format!("line {i}\n\u{e9}\u{1F600}\r\n{{{{ x }}}}\n")).collect();
        let pairs: Vec<(&str, &str)> =
            texts.iter().map(String::as_str).zip(values.iter().map(String::as_str)).collect();
        let runner = FakeRunner::with(&pairs);
        let refs = refs(&texts.iter().map(String::as_str).collect::<Vec<_>>());
        let results = run(&runner, &refs, 8);
        for (result, value) in results.iter().zip(&values) {
            assert_eq!(result.as_ref().unwrap().as_slice(), value.as_bytes());
        }
        let calls = runner.calls();
        assert_eq!(calls.len(), 8, "{calls:?}");
        assert_eq!(calls.iter().map(|c| c.1).sum::<usize>(), 20, "each reference read once: {calls:?}");
    }

    #[test]
    fn a_bad_reference_gets_its_own_error_and_the_others_resolve() {
        let mut runner = FakeRunner::with(&[("op://v/a/f", "1"), ("op://v/a/g", "2"), ("op://v/c/f", "3")]);
        runner.fail.insert(
            "op://v/b/f".into(),
            (ErrorKind::Invalid, "could not read secret 'op://v/b/f': invalid attribute".into()),
        );
        let refs = refs(&["op://v/a/f", "op://v/b/f", "op://v/a/g", "op://v/c/f", "op://v/missing/x"]);
        let results = run(&runner, &refs, 1);
        assert_eq!(results[0].as_ref().unwrap().as_slice(), b"1");
        assert_eq!(results[1].as_ref().unwrap_err().kind, ErrorKind::Invalid);
        assert_eq!(results[2].as_ref().unwrap().as_slice(), b"2");
        assert_eq!(results[3].as_ref().unwrap().as_slice(), b"3");
        let missing = results[4].as_ref().unwrap_err();
        assert_eq!(missing.kind, ErrorKind::NotFound);
        assert!(missing.message.contains("op://v/missing/x"), "{missing}");
    }

    #[test]
    fn an_error_that_names_no_reference_is_bisected() {
        let mut runner = FakeRunner::with(&[("op://v/a/f", "1"), ("op://v/b/f", "2"), ("op://v/c/f", "3")]);
        runner.fail.insert("op://v/d/f".into(), (ErrorKind::NotFound, "item not found".into()));
        let results = run(&runner, &refs(&["op://v/a/f", "op://v/b/f", "op://v/c/f", "op://v/d/f"]), 1);
        assert!(results[..3].iter().all(Result::is_ok));
        assert_eq!(results[3].as_ref().unwrap_err().kind, ErrorKind::NotFound);
    }

    #[test]
    fn auth_failure_applies_to_the_whole_batch_without_narrowing() {
        let mut runner = FakeRunner::with(&[("op://v/a/f", "1"), ("op://v/b/f", "2")]);
        runner.fail.insert("op://v/a/f".into(), (ErrorKind::Auth, "(401) Unauthorized".into()));
        let results = run(&runner, &refs(&["op://v/a/f", "op://v/b/f"]), 1);
        assert!(results.iter().all(|r| r.as_ref().unwrap_err().kind == ErrorKind::Auth));
        assert_eq!(runner.calls().len(), 1);
    }

    #[test]
    fn transient_failures_retry_the_same_batch() {
        let runner = FakeRunner::with(&[("op://v/a/f", "1"), ("op://v/b/f", "2")]);
        *runner.outages.lock().unwrap() = 2;
        let results = run(&runner, &refs(&["op://v/a/f", "op://v/b/f"]), 1);
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(runner.calls().len(), 3);
    }

    #[test]
    fn a_lone_reference_and_duplicates_use_one_read() {
        let runner = FakeRunner::with(&[("op://v/a/f", "1")]);
        let results = run(&runner, &refs(&["op://v/a/f", "op://v/a/f"]), 8);
        assert!(results.iter().all(|r| r.as_ref().unwrap().as_slice() == b"1"));
        assert_eq!(runner.calls(), vec![("read".to_string(), 1)]);
    }

    #[test]
    fn a_value_holding_the_nonce_is_read_alone() {
        let nonce = "ab".repeat(32);
        let out = format!("{nonce}:0\nfine\n{nonce}:1\nevil {nonce}:end\n\n{nonce}:end\n");
        assert!(parse_injected(out.as_bytes(), &nonce, 2).iter().all(Option::is_none));
        let out = format!("{nonce}:0\n\n\n{nonce}:1\n\n{nonce}:end");
        let values = parse_injected(out.as_bytes(), &nonce, 2);
        assert_eq!(values[0].as_deref().map(Vec::as_slice), Some(&b"\n"[..]));
        assert_eq!(values[1].as_deref().map(Vec::as_slice), Some(&b""[..]));
        assert!(parse_injected(b"garbage", &nonce, 2).iter().all(Option::is_none));
    }
}
