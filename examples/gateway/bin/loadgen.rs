//! A fixed-rate HTTP/1.1 load generator for `scripts/bench_proxy.sh`: the latency of one route
//! at a request rate that does not depend on how fast the server answers (open loop), unlike
//! `wrk`, which measures the most requests/s.
//!
//! ```sh
//! loadgen --url http://127.0.0.1:18301/v1/chat/completions --rate 1000 --seconds 10 \
//!     --connections 16 --header 'Authorization: Bearer sk-...' --body '{"model":"mock-small"}'
//! ```
//!
//! Request `i` is due at `start + i / rate` on connection `i % connections` (keep-alive). A
//! connection still waiting for its previous answer sends the next one as soon as it has it; such
//! a request is counted as `late` when it leaves more than 10 ms after it was due (the server did
//! not keep up with the rate, and the figures are not those of that rate). The latency of a request
//! is from its first byte sent to the last byte of its body received. The first second is a warm-up
//! and not counted. Prints one line: `key=value` pairs, latencies in microseconds.

use std::{
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use clap::{Arg, ArgAction, Command};
use http::{header, HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// What one connection saw, after the warm-up.
#[derive(Default)]
struct Tally {
    /// Microseconds, one per 2xx answer.
    latencies: Vec<u64>,
    errors: u64,
    late: u64,
}

struct Plan {
    uri: Uri,
    method: Method,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
    rate: f64,
    connections: usize,
    warmup: Duration,
    total: Duration,
}

fn plan() -> Result<Plan, String> {
    let m = Command::new("loadgen")
        .about("Fixed-rate HTTP/1.1 load: latency percentiles at a given request rate")
        .arg(Arg::new("url").long("url").required(true))
        .arg(
            Arg::new("rate")
                .long("rate")
                .default_value("1000")
                .help("requests per second"),
        )
        .arg(
            Arg::new("seconds")
                .long("seconds")
                .default_value("10")
                .help("measured seconds, after a 1 s warm-up"),
        )
        .arg(
            Arg::new("connections")
                .long("connections")
                .default_value("16"),
        )
        .arg(Arg::new("method").long("method").default_value("POST"))
        .arg(
            Arg::new("header")
                .long("header")
                .action(ArgAction::Append)
                .help("`Name: value`, repeatable"),
        )
        .arg(Arg::new("body").long("body").default_value(""))
        .get_matches();
    let get = |name: &str| m.get_one::<String>(name).cloned().unwrap_or_default();
    let uri: Uri = get("url").parse().map_err(|e| format!("--url: {e}"))?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err("--url must be http://host:port/path".into());
    }
    let rate: f64 = get("rate").parse().map_err(|e| format!("--rate: {e}"))?;
    let seconds: f64 = get("seconds")
        .parse()
        .map_err(|e| format!("--seconds: {e}"))?;
    let connections: usize = get("connections")
        .parse()
        .map_err(|e| format!("--connections: {e}"))?;
    if !(rate > 0.0 && seconds > 0.0 && connections > 0) {
        return Err("--rate, --seconds and --connections must be positive".into());
    }
    let mut headers = Vec::new();
    for line in m.get_many::<String>("header").into_iter().flatten() {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("--header `{line}` is not `Name: value`"))?;
        headers.push((
            HeaderName::try_from(name.trim()).map_err(|e| format!("--header: {e}"))?,
            HeaderValue::try_from(value.trim()).map_err(|e| format!("--header: {e}"))?,
        ));
    }
    let warmup = Duration::from_secs(1);
    Ok(Plan {
        method: get("method")
            .parse()
            .map_err(|e| format!("--method: {e}"))?,
        uri,
        headers,
        body: Bytes::from(get("body")),
        rate,
        connections,
        warmup,
        total: warmup + Duration::from_secs_f64(seconds),
    })
}

/// One keep-alive connection sending requests `c, c + n, c + 2n, ...` on their schedule.
async fn connection(plan: &Plan, c: usize, start: Instant) -> Result<Tally, String> {
    let authority = plan.uri.authority().expect("checked").as_str().to_owned();
    let stream = tokio::net::TcpStream::connect(&authority)
        .await
        .map_err(|e| format!("connect {authority}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let path = plan
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let mut tally = Tally::default();
    let interval = plan.connections as f64 / plan.rate;
    for k in 0u64.. {
        let due = start + Duration::from_secs_f64((c as f64 / plan.rate) + k as f64 * interval);
        if due >= start + plan.total {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        let mut request = Request::builder()
            .method(plan.method.clone())
            .uri(path.as_str())
            .header(header::HOST, authority.as_str())
            .header(header::CONTENT_TYPE, "application/json");
        for (name, value) in &plan.headers {
            request = request.header(name, value);
        }
        let request = request
            .body(Full::new(plan.body.clone()))
            .map_err(|e| e.to_string())?;
        sender
            .ready()
            .await
            .map_err(|e| format!("connection closed: {e}"))?;
        let sent = Instant::now();
        let answered = match sender.send_request(request).await {
            Ok(response) => {
                let ok = response.status().is_success();
                response.into_body().collect().await.is_ok() && ok
            }
            Err(_) => false,
        };
        let took = sent.elapsed();
        if due < start + plan.warmup {
            continue;
        }
        if sent.duration_since(due) > Duration::from_millis(10) {
            tally.late += 1;
        }
        if answered {
            tally.latencies.push(took.as_micros() as u64);
        } else {
            tally.errors += 1;
        }
    }
    Ok(tally)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[tokio::main]
async fn main() -> ExitCode {
    let plan = match plan() {
        Ok(plan) => Arc::new(plan),
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    let start = Instant::now() + Duration::from_millis(100);
    let tasks: Vec<_> = (0..plan.connections)
        .map(|c| {
            let plan = plan.clone();
            tokio::spawn(async move { connection(&plan, c, start).await })
        })
        .collect();
    let mut all = Tally::default();
    for task in tasks {
        match task.await {
            Ok(Ok(tally)) => {
                all.latencies.extend(tally.latencies);
                all.errors += tally.errors;
                all.late += tally.late;
            }
            Ok(Err(error)) => {
                eprintln!("error: {error}");
                return ExitCode::from(1);
            }
            Err(error) => {
                eprintln!("error: {error}");
                return ExitCode::from(1);
            }
        }
    }
    let measured = (plan.total - plan.warmup).as_secs_f64();
    let mut sorted = all.latencies;
    sorted.sort_unstable();
    println!(
        "rate={} ok={} errors={} late={} achieved_rps={:.0} p50_us={} p90_us={} p99_us={} p999_us={} max_us={}",
        plan.rate,
        sorted.len(),
        all.errors,
        all.late,
        (sorted.len() as u64 + all.errors) as f64 / measured,
        percentile(&sorted, 50.0),
        percentile(&sorted, 90.0),
        percentile(&sorted, 99.0),
        percentile(&sorted, 99.9),
        sorted.last().copied().unwrap_or(0),
    );
    if all.errors > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
