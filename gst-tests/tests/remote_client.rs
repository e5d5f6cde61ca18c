//! The remote language-model client against a test double of the server (127.0.0.1): the
//! exact request it sends, and how each failure is classified (retry, or stop and say why).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use candle_core::{Device, Tensor};
use gstllamavid::model::remote::{
    CompletionsClient, RemoteCaptionInput, RemoteError, RemoteLanguageModel, Sampling, ServerConfig,
};
use gstllamavid::model::ModelError;
use llamavid_gst_tests::fake_llm_server::{FakeLlmServer, Reply};

const MODEL: &str = "served-llm";

fn sampling() -> Sampling {
    Sampling {
        max_tokens: 9,
        temperature: 0.0,
        top_p: 1.0,
        seed: 42,
        stop_token_ids: vec![2],
    }
}

fn embeddings(rows: usize) -> (Vec<f32>, Tensor) {
    let values: Vec<f32> = (0..rows * 8).map(|i| (i as f32 * 0.37).sin()).collect();
    let t = Tensor::from_vec(values.clone(), (1, rows, 8), &Device::Cpu).unwrap();
    (values, t)
}

fn input(rows: usize) -> RemoteCaptionInput {
    RemoteCaptionInput {
        embeddings: embeddings(rows).1,
        sampling: sampling(),
        max_positions: 4096,
    }
}

fn client(url: &str) -> CompletionsClient {
    let mut config = ServerConfig::new(url, MODEL);
    config.request_timeout = Duration::from_secs(5);
    CompletionsClient::new(config).unwrap()
}

/// The raw storage inside a `torch.save` archive sent as base64.
fn storage_of(b64: &str) -> Vec<u8> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("standard base64");
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).expect("a zip archive");
    let mut data = Vec::new();
    std::io::Read::read_to_end(&mut zip.by_name("archive/data/0").unwrap(), &mut data).unwrap();
    data
}

#[test]
fn sends_the_embeddings_and_sampling_settings_and_returns_the_ids() {
    let server = FakeLlmServer::start(MODEL);
    server.push_replies([Reply::Completion {
        token_ids: vec![11, 12, 13],
        finish_reason: "stop",
    }]);
    let mut config = ServerConfig::new(format!("{}/v1/", server.url()), MODEL);
    config.api_key = Some("sekret".into());
    let client = CompletionsClient::new(config).unwrap();
    let (values, t) = embeddings(5);
    let completion = client.complete(&t, &sampling()).unwrap();
    // vLLM lists the EOS that stopped it among the ids; the local path does not.
    assert_eq!(completion.token_ids, Some(vec![11, 12, 13]));
    assert_eq!(completion.finish_reason.as_deref(), Some("stop"));

    let requests = server.completions();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.method, "POST");
    assert_eq!(request.header("authorization"), Some("Bearer sekret"));
    assert_eq!(request.header("content-type"), Some("application/json"));
    let body = request.json();
    let fields: Vec<&str> = body
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        fields,
        [
            "max_tokens",
            "model",
            "n",
            "prompt_embeds",
            "return_token_ids",
            "seed",
            "stop_token_ids",
            "stream",
            "temperature",
            "top_p"
        ]
    );
    assert_eq!(body["model"], MODEL);
    assert_eq!(body["max_tokens"], 9);
    assert_eq!(body["temperature"], 0.0);
    assert_eq!(body["top_p"], 1.0);
    assert_eq!(body["seed"], 42);
    assert_eq!(body["stop_token_ids"], serde_json::json!([2]));
    assert_eq!(body["return_token_ids"], true);
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(storage_of(body["prompt_embeds"].as_str().unwrap()), raw);
}

#[test]
fn no_key_no_authorization_header() {
    let server = FakeLlmServer::start(MODEL);
    client(&server.url())
        .complete(&embeddings(2).1, &sampling())
        .unwrap();
    assert_eq!(server.completions()[0].header("authorization"), None);
}

#[test]
fn a_4xx_is_fatal_and_quotes_the_server() {
    let server = FakeLlmServer::start(MODEL);
    server.push_replies([Reply::error(
        400,
        "You must set `--enable-prompt-embeds` to input `prompt_embeds`.",
    )]);
    let error = client(&server.url())
        .complete(&embeddings(2).1, &sampling())
        .unwrap_err();
    assert!(!error.is_retryable(), "{error}");
    assert!(matches!(error, RemoteError::Rejected { status: 400, .. }));
    assert!(
        error.to_string().contains("--enable-prompt-embeds"),
        "{error}"
    );
}

#[test]
fn a_5xx_or_overload_is_retryable() {
    let server = FakeLlmServer::start(MODEL);
    server.push_replies([
        Reply::error(500, "EngineCore encountered an issue"),
        Reply::error(503, "busy"),
        Reply::error(429, "slow down"),
    ]);
    let client = client(&server.url());
    for status in [500, 503, 429] {
        let error = client.complete(&embeddings(2).1, &sampling()).unwrap_err();
        assert!(error.is_retryable(), "{error}");
        assert!(
            matches!(error, RemoteError::ServerError { status: s, .. } if s == status),
            "{error}"
        );
    }
}

#[test]
fn nobody_listening_is_unreachable_and_retryable() {
    let started = Instant::now();
    let error = client(&FakeLlmServer::unused_url())
        .complete(&embeddings(2).1, &sampling())
        .unwrap_err();
    assert!(matches!(error, RemoteError::Unreachable { .. }), "{error}");
    assert!(error.is_retryable());
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_dropped_connection_is_unreachable() {
    let server = FakeLlmServer::start(MODEL);
    server.push_replies([Reply::Hangup]);
    let error = client(&server.url())
        .complete(&embeddings(2).1, &sampling())
        .unwrap_err();
    assert!(matches!(error, RemoteError::Unreachable { .. }), "{error}");
}

#[test]
fn a_slow_server_times_out_at_the_request_timeout() {
    let server = FakeLlmServer::start(MODEL);
    server.push_replies([Reply::Delayed(
        Duration::from_secs(10),
        Box::new(Reply::completion(&[1])),
    )]);
    let mut config = ServerConfig::new(server.url(), MODEL);
    config.request_timeout = Duration::from_millis(300);
    let started = Instant::now();
    let error = CompletionsClient::new(config)
        .unwrap()
        .complete(&embeddings(2).1, &sampling())
        .unwrap_err();
    let waited = started.elapsed();
    assert!(
        matches!(
            error,
            RemoteError::Timeout {
                phase: "answer",
                ..
            }
        ),
        "{error}"
    );
    assert!(error.is_retryable());
    assert!(waited < Duration::from_secs(3), "waited {waited:?}");
}

#[test]
fn a_reply_that_is_no_completion_is_reported() {
    let server = FakeLlmServer::start(MODEL);
    server.push_replies([Reply::Raw {
        status: 200,
        body: "<html>proxy login</html>".into(),
    }]);
    let error = client(&server.url())
        .complete(&embeddings(2).1, &sampling())
        .unwrap_err();
    assert!(matches!(error, RemoteError::BadReply { .. }), "{error}");
    assert!(!error.is_retryable());
}

#[test]
fn bad_urls_are_refused_before_sending() {
    let error = CompletionsClient::new(ServerConfig::new("localhost:8000", MODEL))
        .err()
        .expect("refused");
    assert!(matches!(error, RemoteError::Config { .. }), "{error}");
    assert!(CompletionsClient::new(ServerConfig::new("http://h:1", " ")).is_err());
}

#[test]
fn a_wrong_model_name_names_the_served_ones() {
    let server = FakeLlmServer::start("the-real-one");
    let error = client(&server.url()).check_model().unwrap_err();
    assert!(!error.is_retryable());
    let text = error.to_string();
    assert!(
        text.contains("served-llm") && text.contains("the-real-one"),
        "{text}"
    );
}

#[test]
fn the_model_asks_at_most_what_fits_the_servers_context() {
    // The double serves a 512-position context: 508 prompt rows leave room for 4 tokens.
    let server = FakeLlmServer::start(MODEL);
    let remote = RemoteLanguageModel::new(ServerConfig::new(server.url(), MODEL)).unwrap();
    remote.complete(input(508), None).unwrap();
    assert_eq!(server.completions()[0].json()["max_tokens"], 4);
    assert_eq!(remote.served_model().unwrap().max_model_len, Some(512));
}

#[test]
fn cancelling_stops_waiting_and_keeps_one_request_in_flight() {
    let server = FakeLlmServer::start(MODEL);
    server.push_replies([Reply::Delayed(
        Duration::from_millis(800),
        Box::new(Reply::completion(&[1])),
    )]);
    server.set_default(Reply::completion(&[3, 4]));
    let remote =
        Arc::new(RemoteLanguageModel::new(ServerConfig::new(server.url(), MODEL)).unwrap());
    let cancel = Arc::new(AtomicBool::new(false));
    let waiter = {
        let (remote, cancel) = (remote.clone(), cancel.clone());
        std::thread::spawn(move || {
            let started = Instant::now();
            let result = remote.complete(input(3), Some(&cancel));
            (result, started.elapsed())
        })
    };
    assert!(server.wait_for_completions(1, Duration::from_secs(5)));
    cancel.store(true, std::sync::atomic::Ordering::SeqCst);
    let (result, waited) = waiter.join().unwrap();
    assert!(matches!(result, Err(ModelError::Cancelled)), "{result:?}");
    assert!(
        waited < Duration::from_millis(700),
        "cancel took {waited:?}"
    );

    // The next caption waits for the abandoned request: never two at once.
    assert!(remote.busy(), "the abandoned request is still in flight");
    assert!(
        remote.start(input(3)).is_err(),
        "a second request while one is in flight"
    );
    let completion = remote.complete(input(3), None).unwrap();
    assert_eq!(completion.token_ids, Some(vec![3, 4]));
    assert_eq!(server.completions().len(), 2);
    assert_eq!(server.max_in_flight(), 1);
}
