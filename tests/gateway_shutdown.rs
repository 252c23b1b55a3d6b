//! Graceful termination of a gateway Pod, with the real Envoy 1.40 and the real binary: the sidecar's
//! preStop (`llmroute gateway shutdown`) drains Envoy while a slow SSE stream runs through it, the
//! stream completes, the manager's `GET /shutdown/ready` (Envoy's preStop) answers only after the
//! drain, requests arriving during the drain are still answered (with `connection: close`), and the
//! SIGTERM that follows loses nothing. Also: the bounds when Envoy is not there, and the Deployment's
//! shape.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use llmroute::agent::drain::DRAINED_FILE;
use llmroute::gateway::envoy::EnvoyOptions;
use llmroute::gateway::objects::{self, GatewayDeploymentOptions};
use llmroute::render::{self, RenderOptions};
use llmroute_devkit::sim::{Sim, SimConfig, SimProvider};
use support::envoy::{Envoy, free_port};

const ROUTE_KEY: &str = "llmroute-render-chat";
const BIN: &str = env!("CARGO_BIN_EXE_llmroute");

/// Content chunks of the slow stream and the pause between two: about 3 s in all.
const CHUNKS: usize = 15;
const INTERVAL: Duration = Duration::from_millis(200);

/// A rendered one-route gateway on free 127.0.0.1 ports, in `dir`, pointing at `sim`.
fn render_gateway(dir: &Path, sim: &Sim) -> EnvoyOptions {
    let route = dir.join("route.yaml");
    std::fs::write(
        &route,
        format!(
            r#"apiVersion: llmroute.io/v1alpha1
kind: LLMRoute
metadata: {{ name: chat }}
spec:
  backends:
    - name: primary
      provider: openai-compatible
      endpoint: http://127.0.0.1:{}/v1
      credentialsSecretRef: {{ name: primary, key: key }}
      models: {{ gpt-4o: model-a }}
"#,
            sim.port()
        ),
    )
    .unwrap();
    let gw = dir.join("gateway");
    let opts = EnvoyOptions {
        port: free_port(),
        address: "127.0.0.1".into(),
        admin_port: free_port(),
        health_port: free_port(),
        // llmroute's Envoy module: without it the gateway refuses requests with a body.
        usage_module: support::envoy::sse_usage_module(),
        ..Default::default()
    };
    let routes = render::load_files(&[route]).unwrap_or_else(|e| panic!("{e:?}"));
    let renders = render::translate_offline(
        &routes,
        &RenderOptions {
            namespace: "default".into(),
            default_region: "us".into(),
            envoy: opts.clone(),
            xds: Default::default(),
            deployment: Default::default(),
            operator_namespace: "llmroute-system".into(),
        },
    );
    render::write_gateway_dir(&renders[0], &gw, &opts).unwrap();
    std::fs::write(gw.join("keys/provider_primary_key"), "key-primary").unwrap();
    opts
}

/// The Envoy flags of the gateway Deployment that govern draining (`--drain-time-s`,
/// `--drain-strategy`), so that the Envoy under test drains as the Pod's does.
fn deployment_drain_flags() -> Vec<String> {
    let d = objects::deployment(
        "default",
        &EnvoyOptions::default(),
        &GatewayDeploymentOptions::default(),
        "0",
        &[],
    );
    let envoy = &d.spec.unwrap().template.spec.unwrap().containers[0];
    let args = envoy.args.clone().unwrap();
    let mut flags = Vec::new();
    for flag in ["--drain-time-s", "--drain-strategy"] {
        let i = args.iter().position(|a| a == flag).expect(flag);
        flags.push(args[i].clone());
        flags.push(args[i + 1].clone());
    }
    flags
}

/// A child process killed on drop.
struct Proc(tokio::process::Child, PathBuf);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

impl Proc {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.1).unwrap_or_default()
    }
}

/// `llmroute gateway shutdown` against the admin port, with [minimum, maximum drain, poll].
fn spawn_shutdown(admin_port: u16, times: [&str; 3], state_dir: &Path, log: PathBuf) -> Proc {
    let port = admin_port.to_string();
    let [min, max, poll] = times;
    spawn(
        &[
            "gateway",
            "shutdown",
            "--admin-port",
            &port,
            "--min-drain",
            min,
            "--max-drain",
            max,
            "--poll",
            poll,
            "--state-dir",
            state_dir.to_str().unwrap(),
        ],
        log,
    )
}

fn spawn(args: &[&str], log: PathBuf) -> Proc {
    let file = std::fs::File::create(&log).unwrap();
    let child = tokio::process::Command::new(BIN)
        .args(args)
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start llmroute");
    Proc(child, log)
}

/// Starts `llmroute gateway shutdown-manager` on 127.0.0.1 and waits (bounded) until it listens.
async fn start_manager(port: u16, state_dir: &Path, ready_timeout: &str, log: PathBuf) -> Proc {
    // No usage endpoint (it would take its fixed port; these tests read no counts).
    start_manager_with(port, state_dir, ready_timeout, log, &["--tls-dir="]).await
}

/// [`start_manager`] with `extra` flags.
async fn start_manager_with(
    port: u16,
    state_dir: &Path,
    ready_timeout: &str,
    log: PathBuf,
    extra: &[&str],
) -> Proc {
    let (port_text, log_file) = (port.to_string(), state_dir.join("access.log"));
    let mut args = vec![
        "gateway",
        "shutdown-manager",
        "--address",
        "127.0.0.1",
        "--port",
        &port_text,
        "--state-dir",
        state_dir.to_str().unwrap(),
        "--ready-timeout",
        ready_timeout,
        // Its usage log in its own directory (tests run side by side).
        "--usage-log",
        log_file.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let manager = spawn(&args, log);
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return manager;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("shutdown manager not listening: {}", manager.log());
}

fn client() -> reqwest::Client {
    llmroute_devkit::tls::http_client()
}

fn chat_request(client: &reqwest::Client, port: u16, stream: bool) -> reqwest::RequestBuilder {
    client
        .post(format!("http://127.0.0.1:{port}/chat/v1/chat/completions"))
        .bearer_auth(ROUTE_KEY)
        .timeout(Duration::from_secs(20))
        .json(&serde_json::json!({
            "model": "gpt-4o",
            "stream": stream,
            "messages": [{ "role": "user", "content": "hi" }],
        }))
}

/// `GET /shutdown/ready` on the manager: (status, body, when it answered).
async fn wait_ready(port: u16) -> (u16, String, Instant) {
    let resp = client()
        .get(format!("http://127.0.0.1:{port}/shutdown/ready"))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("GET /shutdown/ready");
    let at = Instant::now();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default(), at)
}

/// A simulator streaming `chunks` chunks `interval` apart, and a rendered gateway in front of it,
/// run by Envoy with the Deployment's drain flags.
async fn start_gateway(
    chunks: usize,
    interval: Duration,
) -> (Sim, tempfile::TempDir, EnvoyOptions, Envoy) {
    let sim = Sim::start(
        SimConfig::new(SimProvider::OpenAI)
            .key("key-primary")
            .any_model()
            .lenient_paths()
            .stream(chunks, interval),
    )
    .await
    .unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let opts = render_gateway(scratch.path(), &sim);
    let envoy = Envoy::start_with(
        &scratch.path().join("gateway/bootstrap.yaml"),
        opts.admin_port,
        opts.health_port,
        scratch.path().join("envoy.log"),
        &deployment_drain_flags(),
    );
    (sim, scratch, opts, envoy)
}

/// Waits (bounded) until `n` requests are in flight on the gateway's front listener.
async fn until_active(envoy: &Envoy, n: u64) {
    for _ in 0..100 {
        if envoy.stat("http.gateway.downstream_rq_active") == Some(n) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("never {n} requests in flight: {}", envoy.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_in_flight_completes_through_a_drain_and_sigterm_loses_nothing() {
    let (sim, scratch, opts, mut envoy) = start_gateway(CHUNKS, INTERVAL).await;
    let state_dir = scratch.path().join("shutdown-state");
    let manager_port = free_port();
    let manager = start_manager(
        manager_port,
        &state_dir,
        "30s",
        scratch.path().join("manager.log"),
    )
    .await;
    let port = opts.port;

    // A kept-alive connection, opened before the drain.
    let keepalive = client();
    let resp = chat_request(&keepalive, port, false).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("connection").is_none());
    resp.bytes().await.unwrap();

    // The slow stream: every chunk with the time it arrived.
    let stream = tokio::spawn(async move {
        let mut resp = chat_request(&client(), port, true).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = Vec::new();
        let mut first = None;
        while let Some(chunk) = resp.chunk().await.expect("the stream is not cut") {
            first.get_or_insert_with(Instant::now);
            body.extend_from_slice(&chunk);
        }
        (
            String::from_utf8(body).unwrap(),
            first.unwrap(),
            Instant::now(),
        )
    });
    // Envoy's preStop GET, issued before the drain starts.
    let early_ready = tokio::spawn(wait_ready(manager_port));
    until_active(&envoy, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The sidecar's preStop.
    let shutdown_started = Instant::now();
    let mut shutdown = spawn_shutdown(
        opts.admin_port,
        ["1s", "20s", "100ms"],
        &state_dir,
        scratch.path().join("shutdown.log"),
    );
    // A GET issued while draining.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let late_ready = tokio::spawn(wait_ready(manager_port));

    // New requests during the drain are answered, with `connection: close`: on a new connection...
    let resp = chat_request(&client(), port, false).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["connection"], "close");
    resp.bytes().await.unwrap();
    // ...and on the connection kept alive from before.
    let resp = chat_request(&keepalive, port, false).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["connection"], "close");
    resp.bytes().await.unwrap();
    assert!(
        shutdown.0.try_wait().unwrap().is_none(),
        "shutdown returned while the stream was in flight"
    );

    let status = tokio::time::timeout(Duration::from_secs(30), shutdown.0.wait())
        .await
        .expect("shutdown within its bound")
        .unwrap();
    let shutdown_done = Instant::now();
    assert!(status.success(), "shutdown: {status}\n{}", shutdown.log());
    assert!(state_dir.join(DRAINED_FILE).exists());

    // The stream completed, in full, across the drain.
    let (body, first_chunk, stream_done) = stream.await.unwrap();
    let events: Vec<&str> = body
        .split("\n\n")
        .filter(|e| e.starts_with("data: "))
        .collect();
    assert_eq!(
        events.len(),
        CHUNKS + 2,
        "every chunk, the finish chunk and [DONE]: {body}"
    );
    assert_eq!(events.last(), Some(&"data: [DONE]"));
    assert!(body.contains("\"finish_reason\":\"stop\""));

    // The drain lasted until the stream was over (not just the minimum drain), and no longer than
    // a poll or two after it.
    assert!(stream_done > shutdown_started + Duration::from_secs(1));
    assert!(
        shutdown_done + Duration::from_millis(50) >= stream_done,
        "shutdown ended {:?} before the stream",
        stream_done - shutdown_done
    );
    assert!(shutdown_done < stream_done + Duration::from_secs(2));

    // Both GETs of /shutdown/ready answered only after the drain.
    for (name, waiter) in [("early", early_ready), ("late", late_ready)] {
        let (code, text, at) = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the manager answers once drained")
            .unwrap();
        assert_eq!(code, 200, "{name}");
        assert_eq!(text.trim(), "drained", "{name}");
        assert!(
            at + Duration::from_millis(50) >= shutdown_done,
            "{name} GET answered before the drain was over"
        );
    }

    // Envoy had told clients to close, and nothing is in flight: SIGTERM (the kubelet's, once the
    // preStop GET answered) loses nothing.
    assert!(
        envoy
            .stat("http.gateway.downstream_cx_drain_close")
            .unwrap_or(0)
            >= 2,
        "{:?}",
        envoy.stats_matching("http.gateway.downstream_cx")
    );
    assert_eq!(envoy.stat("http.gateway.downstream_rq_active"), Some(0));
    let ok = envoy.stat("http.gateway.downstream_rq_2xx").unwrap();
    assert_eq!(ok, 4, "every request answered 200");
    let exit = envoy.terminate(Duration::from_secs(10));
    assert!(exit.is_some(), "envoy did not exit on SIGTERM");
    assert_eq!(
        sim.requests().len(),
        4,
        "no request was retried or duplicated"
    );

    // The manager logged how the drain went, and exits on SIGTERM.
    let mut manager = manager;
    let pid = manager.0.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(Duration::from_secs(5), manager.0.wait())
        .await
        .expect("the manager exits on SIGTERM")
        .unwrap();
    assert!(status.success(), "{}", manager.log());
    assert!(manager.log().contains("drain done"), "{}", manager.log());
    eprintln!(
        "stream: first chunk {:?} before the drain, over {:?} after the drain started; \
         shutdown took {:?} (minimum 1s)",
        shutdown_started - first_chunk,
        stream_done - shutdown_started,
        shutdown_done - shutdown_started
    );
}

/// No Envoy on the admin port: `shutdown` neither hangs nor waits the drain times, fails visibly
/// (exit 1, so the kubelet records a FailedPreStopHook event) and still releases the manager.
#[tokio::test]
async fn shutdown_without_envoy_returns_at_once() {
    let scratch = tempfile::tempdir().unwrap();
    let state_dir = scratch.path().join("state");
    let manager_port = free_port();
    let _manager = start_manager(
        manager_port,
        &state_dir,
        "30s",
        scratch.path().join("manager.log"),
    )
    .await;
    let waiter = tokio::spawn(wait_ready(manager_port));
    let started = Instant::now();
    let mut shutdown = spawn_shutdown(
        free_port(),
        ["10s", "60s", "100ms"],
        &state_dir,
        scratch.path().join("shutdown.log"),
    );
    let status = tokio::time::timeout(Duration::from_secs(5), shutdown.0.wait())
        .await
        .expect("shutdown returns within its bound without Envoy")
        .unwrap();
    assert_eq!(status.code(), Some(1), "{}", shutdown.log());
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(shutdown.log().contains("unreachable"), "{}", shutdown.log());
    let (code, text, _) = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the manager is released")
        .unwrap();
    assert_eq!((code, text.trim()), (200, "drained"));
}

/// Without a drain, `GET /shutdown/ready` answers after the manager's timeout; SIGTERM answers the
/// waiters at once and the manager exits.
#[tokio::test]
async fn the_manager_bounds_every_wait() {
    let scratch = tempfile::tempdir().unwrap();
    let state_dir = scratch.path().join("state");
    // A drained file of an earlier run is not taken for this one's.
    std::fs::create_dir_all(&state_dir).unwrap();
    std::fs::write(state_dir.join(DRAINED_FILE), "old").unwrap();
    let port = free_port();
    let manager = start_manager(port, &state_dir, "1s", scratch.path().join("m.log")).await;
    let started = Instant::now();
    let (code, text, at) = wait_ready(port).await;
    assert_eq!((code, text.trim()), (200, "timeout"));
    assert!(at - started >= Duration::from_secs(1));
    assert!(at - started < Duration::from_secs(3));

    // Only GET /shutdown/ready is served: nothing starts a drain.
    let resp = client()
        .post(format!("http://127.0.0.1:{port}/shutdown/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);

    drop(manager);
    let port = free_port();
    let mut manager = start_manager(port, &state_dir, "60s", scratch.path().join("m2.log")).await;
    let waiter = tokio::spawn(wait_ready(port));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = manager.0.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let (code, text, _) = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("SIGTERM releases the waiter")
        .unwrap();
    assert_eq!((code, text.trim()), (200, "shutdown manager stopping"));
    let status = tokio::time::timeout(Duration::from_secs(5), manager.0.wait())
        .await
        .expect("the manager exits on SIGTERM")
        .unwrap();
    assert!(status.success(), "{}", manager.log());
}

/// A stream longer than the maximum drain: `shutdown` gives up at the maximum (exit 0, logged, the
/// manager released), and the stream is then cut by Envoy's SIGTERM: the bound is a bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_drain_gives_up_at_its_maximum() {
    let (_sim, scratch, opts, mut envoy) = start_gateway(40, Duration::from_millis(100)).await;
    let port = opts.port;
    let stream = tokio::spawn(async move {
        let mut resp = chat_request(&client(), port, true).send().await.unwrap();
        let mut body = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(c)) => body.extend_from_slice(&c),
                Ok(None) => return (String::from_utf8_lossy(&body).into_owned(), true),
                Err(_) => return (String::from_utf8_lossy(&body).into_owned(), false),
            }
        }
    });
    until_active(&envoy, 1).await;
    let state_dir = scratch.path().join("state");
    let started = Instant::now();
    let mut shutdown = spawn_shutdown(
        opts.admin_port,
        ["200ms", "1s", "100ms"],
        &state_dir,
        scratch.path().join("shutdown.log"),
    );
    let status = tokio::time::timeout(Duration::from_secs(10), shutdown.0.wait())
        .await
        .expect("shutdown within its bound")
        .unwrap();
    let took = started.elapsed();
    assert!(status.success(), "{}", shutdown.log());
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(
        shutdown.log().contains("maximum drain time reached"),
        "{}",
        shutdown.log()
    );
    let summary = std::fs::read_to_string(state_dir.join(DRAINED_FILE)).unwrap();
    assert!(
        summary.starts_with("maximum drain time reached with 1 requests in flight"),
        "{summary}"
    );
    // What the drain could not save: SIGTERM cuts the rest of the stream.
    assert!(envoy.terminate(Duration::from_secs(10)).is_some());
    let (body, complete) = tokio::time::timeout(Duration::from_secs(10), stream)
        .await
        .unwrap()
        .unwrap();
    assert!(!complete && !body.contains("[DONE]"), "{body}");
}

/// The usage endpoint answers the operator only: over mutual TLS with the gateway's certificate,
/// to a client certificate of the same CA naming the operator. Plain HTTP, a client without a
/// certificate, another CA's operator, and the gateway's own certificate used as a client get
/// nothing; the operator that expects another namespace's gateway refuses the server; `/usage` is
/// not on the manager's plain port.
#[tokio::test]
async fn the_usage_endpoint_answers_the_operator_only() {
    use llmroute::operator::usage_read::UsageReader;
    use llmroute::xds::tls::{Authority, gateway_identity};
    use std::sync::Arc;
    let scratch = tempfile::tempdir().unwrap();
    let state_dir = scratch.path().join("state");
    let certs = scratch.path().join("xds");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::create_dir_all(&state_dir).unwrap();
    let now = std::time::SystemTime::now();
    let ca = Arc::new(Authority::generate(now).unwrap());
    let gateway = ca.issue_gateway("team-a", now).unwrap();
    std::fs::write(certs.join("tls.crt"), &gateway.cert).unwrap();
    std::fs::write(certs.join("tls.key"), &gateway.key).unwrap();
    std::fs::write(certs.join("ca.crt"), &ca.cert_pem).unwrap();
    let (port, usage_port) = (free_port(), free_port());
    let usage_flag = format!("--usage-port={usage_port}");
    let tls_flag = format!("--tls-dir={}", certs.display());
    let _manager = start_manager_with(
        port,
        &state_dir,
        "30s",
        scratch.path().join("manager.log"),
        &[&usage_flag, &tls_flag],
    )
    .await;
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], usage_port).into();

    // The operator reads and acknowledges.
    let operator = UsageReader::new(ca.clone()).unwrap();
    let report = support::cluster::eventually(Duration::from_secs(10), "/usage", || async {
        operator.read("team-a", addr).await.ok()
    })
    .await;
    operator
        .acknowledge("team-a", addr, &report.boot, report.seq)
        .await
        .unwrap();
    assert!(
        operator
            .acknowledge("team-a", addr, "another-boot", 1)
            .await
            .unwrap_err()
            .contains("409")
    );
    // ...but not from a server that is not the gateway of the namespace it expects.
    let wrong = operator.read("team-b", addr).await.unwrap_err();
    assert!(wrong.contains("TLS"), "{wrong}");
    // Another CA's operator is refused in the handshake.
    let stranger = UsageReader::new(Arc::new(Authority::generate(now).unwrap())).unwrap();
    assert!(stranger.read("team-a", addr).await.is_err());

    // Clients that are not the operator.
    let url = format!("https://{}:{usage_port}/usage", gateway_identity("team-a"));
    let client = |identity: Option<&llmroute::xds::tls::Pem>| {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject;
        roots
            .add(rustls::pki_types::CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap())
            .unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let config = match identity {
            Some(pem) => builder
                .with_client_auth_cert(
                    vec![
                        rustls::pki_types::CertificateDer::from_pem_slice(pem.cert.as_bytes())
                            .unwrap(),
                    ],
                    rustls::pki_types::PrivateKeyDer::from_pem_slice(pem.key.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        reqwest::Client::builder()
            .use_preconfigured_tls(config)
            .resolve(&gateway_identity("team-a"), addr)
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap()
    };
    assert!(
        client(None).get(&url).send().await.is_err(),
        "no client certificate"
    );
    let as_gateway = client(Some(&gateway)).get(&url).send().await;
    assert!(
        as_gateway.is_err(),
        "the gateway's certificate as a client: {as_gateway:?}"
    );
    let plain = llmroute_devkit::tls::http_client()
        .get(format!("http://127.0.0.1:{usage_port}/usage"))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP: {plain:?}");
    let manager_port = llmroute_devkit::tls::http_client()
        .get(format!("http://127.0.0.1:{port}/usage"))
        .send()
        .await
        .unwrap();
    assert_eq!(manager_port.status(), 404);
}
